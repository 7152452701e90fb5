"""`safe data validate-wavcaps` / `python scripts/validate_wavcaps.py`: will training load every WavCaps row?

Every row is checked (not a sample): its keys, its path through the one resolver, the file's existence and,
unless --quick, its audio header. `--test-loading --num-samples N` then decodes N rows through the real
WavCapsDataset (the code path training uses). Exit status 0 only when every row would load.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safe.core.errors import SafeError
from safe.data.manifest import ManifestError, check_row, iter_jsonl, resolve_media_path
from safe.staging.wavcaps_fix import find_manifest


def _check(manifest: Path, data_root: Path, number: int, row: dict, quick: bool, allow_outside: bool) -> str | None:
    """None when the row would load, else a short reason."""
    from safe.data.audio import AudioLoadError, audio_info

    try:
        check_row(row, "wavcaps", f"{manifest.name}:{number}")
        path = resolve_media_path(row["audio_path"], manifest, data_root, allow_outside)
    except ManifestError as exc:
        return "bad row: " + str(exc).replace(f"{manifest}: ", "")
    if not path.is_file():
        return f"missing file: {row['audio_path']}"
    if quick:
        return None
    try:
        audio_info(path)
    except AudioLoadError as exc:
        return f"unreadable: {exc}"
    return None


def _fix_hint(wavcaps_dir: Path) -> str:
    return (f"run `python scripts/fix_wavcaps_paths.py --wavcaps-dir {wavcaps_dir}` (or `safe data fix-wavcaps`) "
            "to point the manifest at the files on disk, then validate again")


def _test_loading(wavcaps_dir: Path, manifest: Path, num_samples: int, sample_rate: int, clip_seconds: float,
                  seed: int, allow_outside: bool) -> tuple[int, int, list[str]]:
    """Decode `num_samples` random rows through WavCapsDataset; returns (attempted, loaded, failure reasons)."""
    import numpy as np

    from safe.data.datasets import WavCapsDataset

    names = ("wavcaps_train.jsonl", "train.jsonl")
    if manifest.parent.resolve() != wavcaps_dir.resolve() or manifest.name not in names:
        raise SafeError(f"--test-loading reads the manifest the way training does, as "
                        f"{wavcaps_dir}/wavcaps_train.jsonl; {manifest} is not that file.")
    with tempfile.TemporaryDirectory(prefix="safe-wavcaps-") as temp:
        # Training reads <data-root>/wavcaps/; a folder named otherwise is reached through a link of that name.
        data_root = wavcaps_dir.parent
        if wavcaps_dir.name != "wavcaps":
            data_root = Path(temp)
            os.symlink(os.path.abspath(wavcaps_dir), data_root / "wavcaps")
        try:
            dataset = WavCapsDataset(data_root, "train", sample_rate=sample_rate, clip_seconds=clip_seconds,
                                     training=False, seed=seed, allow_outside_paths=allow_outside)
        except SafeError as exc:
            return 0, 0, [f"the dataset could not be built: {exc}"]
        count = min(num_samples, len(dataset))
        picks = np.random.default_rng(seed).choice(len(dataset), size=count, replace=False)
        loaded, failures = 0, []
        for index in sorted(int(i) for i in picks):
            item = dataset[index]
            if item["kind"] == "bad":
                failures.append(f"{item['id']}: {item['reason']}")
            else:
                loaded += 1
        return count, loaded, failures


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wavcaps-dir", required=True, help="folder holding wavcaps_train.jsonl and audio/")
    parser.add_argument("--manifest", help="manifest to check (default: <wavcaps-dir>/wavcaps_train.jsonl)")
    parser.add_argument("--quick", action="store_true", help="only check that every file exists (no header read)")
    parser.add_argument("--test-loading", action="store_true", help="decode --num-samples rows through WavCapsDataset")
    parser.add_argument("--num-samples", type=int, default=10, help="rows to decode with --test-loading (default 10)")
    parser.add_argument("--sample-rate", type=int, default=48000, help="decode rate for --test-loading (default 48000)")
    parser.add_argument("--clip-seconds", type=float, default=10.0, help="clip length for --test-loading (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="which rows --test-loading picks")
    parser.add_argument("--workers", type=int, default=8, help="threads for the per-row checks (default 8)")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="accept absolute paths and paths leaving the data root (as training's flag does)")


def run(args: argparse.Namespace) -> int:
    wavcaps_dir = Path(args.wavcaps_dir)
    if not wavcaps_dir.is_dir():
        raise SafeError(f"WavCaps folder {wavcaps_dir} does not exist; check --wavcaps-dir.")
    if args.num_samples < 1:
        raise SafeError("--num-samples must be at least 1.")
    manifest = find_manifest(wavcaps_dir, args.manifest)
    data_root = wavcaps_dir.parent
    numbered = list(iter_jsonl(manifest))
    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
        reasons = list(tqdm(pool.map(lambda nr: _check(manifest, data_root, nr[0], nr[1], args.quick,
                                                       args.allow_outside_paths), numbered),
                            total=len(numbered), desc="check", unit="row", disable=not sys.stderr.isatty(),
                            leave=False))
    problems = [(number, reason) for (number, _), reason in zip(numbered, reasons) if reason]
    kinds = Counter(reason.split(":", 1)[0] for _, reason in problems)
    total = len(numbered)
    what = "exist" if args.quick else "exist and have a readable audio header"
    print(f"{manifest}: {total} rows; {total - len(problems)} {what}; "
          + (", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no problems"))
    for number, reason in problems[:10]:
        print(f"  {manifest.name}:{number}: {reason}")
    if len(problems) > 10:
        print(f"  ... and {len(problems) - 10} more")
    ok = total > 0 and not problems
    if total == 0:
        print(f"No samples were processed: {manifest} has no rows; rebuild it with `safe data prepare wavcaps`.")
    elif len(problems) == total:
        print(f"No samples were processed: none of the {total} rows points at a usable audio file (first: "
              f"{problems[0][1]}); {_fix_hint(wavcaps_dir)}.")
    elif problems:
        print(f"{len(problems)} of {total} rows would be skipped in training; {_fix_hint(wavcaps_dir)}.")
    if args.test_loading and total:
        attempted, loaded, failures = _test_loading(wavcaps_dir, manifest, args.num_samples, args.sample_rate,
                                         args.clip_seconds, args.seed, args.allow_outside_paths)
        print(f"Test loading through WavCapsDataset at {args.sample_rate} Hz: {loaded} of {attempted} "
              f"sampled rows decoded")
        for reason in failures[:5]:
            print(f"  failed: {reason}")
        if loaded == 0:
            print(f"No samples were processed: no sampled row could be decoded ({failures[0] if failures else '?'}); "
                  f"{_fix_hint(wavcaps_dir)}.")
        ok = ok and not failures and loaded > 0
    print("OK: every WavCaps row would load in training." if ok else "NOT OK: see above.")
    return 0 if ok else 1


def main(argv: list[str] | None = None, prog: str = "safe data validate-wavcaps") -> int:
    from safe.core.commands import standalone

    return standalone(__name__, argv, prog, "Check that every WavCaps row would load in training.")

