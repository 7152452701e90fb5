"""`safe data fix-wavcaps` / `python scripts/fix_wavcaps_paths.py`: point every WavCaps row at its real file.

WavCaps metadata names files as `.wav` while the released archives hold `.flac`, subset folders get renamed
or symlinked to other disks, and old manifests carry absolute paths from another cluster. This scans the
audio tree once (following symlinked folders, each real folder visited once, so cycles end), indexes files
by stem and subset folder, matches each row by stem inside its own subset (so `FreeSound/1.flac` and
`SoundBible/1.flac` stay apart), and rewrites `audio_path` relative to the manifest's folder: the one
resolver rule (safe.data.manifest.resolve_media_path), so the loader then finds every file.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from safe.core.errors import SafeError
from safe.data.manifest import iter_jsonl, write_jsonl

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".au", ".m4a", ".webm"}
MANIFEST_NAMES = ("wavcaps_train.jsonl", "train.jsonl")


def norm(text: str) -> str:
    """Subset names compared loosely: 'AudioSet_SL' matches folders 'audioset_sl' and 'AudioSet_SL_flac'."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


@dataclass
class AudioFile:
    rel: str  # posix path relative to the scanned audio folder, through symlinked folders (lexical)
    subset: str  # first folder under the audio folder ('' for files at its top)
    stem: str
    suffix: str


@dataclass
class ScanStats:
    files: int = 0
    folders: int = 0
    linked_folders: int = 0
    cycles_skipped: int = 0
    broken_links: int = 0
    unreadable: int = 0


@dataclass
class AudioIndex:
    root: Path
    by_stem: dict[str, list[AudioFile]] = field(default_factory=lambda: defaultdict(list))
    subsets: set[str] = field(default_factory=set)
    stats: ScanStats = field(default_factory=ScanStats)


def scan_audio_tree(root: str | Path) -> AudioIndex:
    """Index every audio file under `root`, following symlinked folders; a real folder is entered once."""
    root = Path(root)
    index = AudioIndex(root=root)
    seen: set[tuple[int, int]] = set()
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, ())]
    try:
        st = os.stat(root)
    except OSError:
        raise SafeError(f"Audio folder {root} does not exist; pass --audio-dir or extract the WavCaps audio there.")
    seen.add((st.st_dev, st.st_ino))
    while stack:
        folder, rel = stack.pop()
        index.stats.folders += 1
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            index.stats.unreadable += 1
            continue
        for entry in reversed(entries):  # reversed + stack pop = sorted, deterministic walk order
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                is_dir = is_file = False
            if is_dir:
                info = os.stat(entry.path)
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    # A cycle (a link to an ancestor) or a second alias of a folder already indexed.
                    index.stats.cycles_skipped += 1
                    continue
                seen.add(key)
                if entry.is_symlink():
                    index.stats.linked_folders += 1
                stack.append((Path(entry.path), rel + (entry.name,)))
            elif is_file:
                suffix = Path(entry.name).suffix.lower()
                if suffix in AUDIO_EXTENSIONS:
                    parts = rel + (entry.name,)
                    subset = rel[0] if rel else ""
                    record = AudioFile("/".join(parts), subset, Path(entry.name).stem, suffix)
                    index.by_stem[record.stem].append(record)
                    index.subsets.add(subset)
                    index.stats.files += 1
            elif entry.is_symlink():
                index.stats.broken_links += 1
    return index


def _path_parts(text: str) -> tuple[str, ...]:
    """Components of a manifest path written on any OS (Windows backslashes included)."""
    if "\\" in text:
        return tuple(p for p in PureWindowsPath(text).parts if p not in ("\\", "/"))
    return tuple(p for p in PurePosixPath(text).parts if p != "/")


def _subset_hint(row: dict, parts: tuple[str, ...], index: AudioIndex) -> str | None:
    if row.get("subset"):
        return str(row["subset"])
    known = {norm(s): s for s in index.subsets if s}
    for part in parts[:-1]:
        if norm(part) in known:
            return known[norm(part)]
    return None


def _in_subset(candidate: AudioFile, hint: str) -> bool:
    wanted = norm(hint)
    return bool(wanted) and any(wanted in norm(p) for p in candidate.rel.split("/")[:-1])


def _common_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    count = 0
    while count < min(len(a), len(b)) and a[-1 - count].lower() == b[-1 - count].lower():
        count += 1
    return count


@dataclass
class Match:
    status: str  # "matched", "unmatched", "ambiguous"
    file: AudioFile | None = None
    candidates: list[AudioFile] = field(default_factory=list)
    other_subset: bool = False


def match_row(row: dict, index: AudioIndex) -> Match:
    """Find the one file for a row: same stem, same subset (loosely named), best path tail, same extension."""
    raw = str(row.get("audio_path") or "")
    parts = _path_parts(raw) if raw else ()
    stem = Path(parts[-1]).stem if parts else ""
    if not stem or stem == "wav_path":  # official WavCaps JSON carries the placeholder "wav_path"
        stem = Path(str(row.get("id", ""))).stem
    candidates = index.by_stem.get(stem, [])
    if not candidates:
        return Match("unmatched")
    hint = _subset_hint(row, parts, index)
    other = False
    pool = [c for c in candidates if _in_subset(c, hint)] if hint else list(candidates)
    if hint and not pool:
        # The row's subset has no such file; accept one elsewhere only when it is the only candidate.
        pool, other = list(candidates), True
        if len(pool) > 1:
            return Match("ambiguous", candidates=pool)
    if len(pool) == 1:
        return Match("matched", pool[0], pool, other)
    # Several files with this stem in the same subset: prefer the longest matching path tail, then extension.
    tail = tuple(Path(p).stem if i == len(parts) - 1 else p for i, p in enumerate(parts))
    suffix = Path(parts[-1]).suffix.lower() if parts else ""

    def score(c: AudioFile) -> tuple[int, int]:
        cparts = tuple(c.rel.split("/")[:-1]) + (c.stem,)
        return (_common_tail(cparts, tail), int(c.suffix == suffix))

    ranked = sorted(pool, key=score, reverse=True)
    if score(ranked[0]) > score(ranked[1]):
        return Match("matched", ranked[0], pool, other)
    return Match("ambiguous", candidates=pool)


def find_manifest(wavcaps_dir: Path, manifest: str | None) -> Path:
    if manifest:
        path = Path(manifest)
        if not path.is_file():
            raise SafeError(f"Manifest {path} does not exist; check --manifest.")
        return path
    for name in MANIFEST_NAMES:
        if (wavcaps_dir / name).is_file():
            return wavcaps_dir / name
    raise SafeError(
        f"No wavcaps_train.jsonl in {wavcaps_dir}; pass --manifest, or build it from the official JSON files with "
        f"`safe data prepare wavcaps --json-dir DIR --audio-dir {wavcaps_dir / 'audio'} --out {wavcaps_dir}`."
    )


def decode_check(path: Path) -> str | None:
    """None when the file's header parses and its first samples decode; else the reason."""
    import soundfile as sf

    from safe.data.audio import AudioLoadError, audio_info

    try:
        audio_info(path)
        with sf.SoundFile(str(path)) as handle:
            data = handle.read(frames=4096, dtype="float32")
        if len(data) == 0:
            return "no samples"
    except AudioLoadError as exc:
        return str(exc)
    except Exception as exc:  # libsndfile raises several types for corrupt data
        return f"cannot decode: {exc}"
    return None


@dataclass
class FixResult:
    rows: list[dict]
    counts: Counter
    problems: list[tuple[int, str]]  # (line, reason) for unmatched / ambiguous / undecodable rows


def fix_rows(numbered_rows: list[tuple[int, dict]], index: AudioIndex, audio_dir: Path, out_dir: Path,
             validate_audio: bool = False, progress: bool = False) -> FixResult:
    """Rewrite matched rows' audio_path relative to `out_dir`; unmatched rows are kept unchanged and listed."""
    from tqdm import tqdm

    counts: Counter = Counter()
    problems: list[tuple[int, str]] = []
    rows: list[dict] = []
    prefix = os.path.relpath(os.path.abspath(audio_dir), os.path.abspath(out_dir))
    for number, row in tqdm(numbered_rows, desc="match", unit="row", disable=not progress, leave=False):
        counts["rows"] += 1
        found = match_row(row, index)
        if found.status != "matched":
            counts[found.status] += 1
            where = ", ".join(c.rel for c in found.candidates[:3])
            candidates = f" (candidates {where})" if where else ""
            problems.append((number, f"{found.status}: {row.get('audio_path')!r}" + candidates))
            rows.append(row)
            continue
        assert found.file is not None  # a match names its file
        new_path = PurePosixPath(*Path(prefix).parts, *found.file.rel.split("/")).as_posix() if prefix != "." \
            else found.file.rel
        if validate_audio:
            reason = decode_check(audio_dir / found.file.rel)
            if reason:
                # The right file, but broken: point at it anyway (re-downloading it fixes the row) and list it.
                counts["undecodable"] += 1
                problems.append((number, f"undecodable: {new_path} ({reason})"))
                rows.append(dict(row, audio_path=new_path))
                continue
        counts["matched"] += 1
        old = str(row.get("audio_path") or "")
        if old != new_path:
            counts["rewritten"] += 1
            if old and Path(old).suffix.lower() != found.file.suffix:
                counts["extension_fixed"] += 1
        if found.other_subset:
            counts["other_subset_folder"] += 1
        fixed = dict(row, audio_path=new_path)
        fixed.setdefault("subset", found.file.subset)
        rows.append(fixed)
    return FixResult(rows, counts, problems)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wavcaps-dir", required=True, help="folder holding wavcaps_train.jsonl and audio/")
    parser.add_argument("--manifest", help="manifest to fix (default: <wavcaps-dir>/wavcaps_train.jsonl)")
    parser.add_argument("--audio-dir", help="audio tree to scan (default: <wavcaps-dir>/audio)")
    parser.add_argument("--output", help="write the fixed manifest here (default: rewrite the manifest in place, "
                        "keeping the original as <manifest>.bak)")
    parser.add_argument("--dry-run", action="store_true", help="report what would change; write nothing")
    parser.add_argument("--validate-audio", action="store_true", help="also decode the start of every matched file")
    parser.add_argument("--drop-unmatched", action="store_true",
                        help="leave unmatched/ambiguous rows out of the output "
                             "(they are listed in <output>.unmatched.txt)")


def run(args: argparse.Namespace) -> int:
    wavcaps_dir = Path(args.wavcaps_dir)
    if not wavcaps_dir.is_dir():
        raise SafeError(f"WavCaps folder {wavcaps_dir} does not exist; check --wavcaps-dir.")
    manifest = find_manifest(wavcaps_dir, args.manifest)
    audio_dir = Path(args.audio_dir) if args.audio_dir else wavcaps_dir / "audio"
    output = Path(args.output) if args.output else manifest
    progress = sys.stderr.isatty()
    if os.path.relpath(os.path.abspath(audio_dir), os.path.abspath(output.parent)).startswith(".."):
        raise SafeError(
            f"The audio folder {audio_dir} is not inside {output.parent}, so the manifest could not reach it by a "
            f"relative path; link it there (ln -s {os.path.abspath(audio_dir)} {output.parent / 'audio'}) and pass "
            "that path as --audio-dir."
        )
    numbered = list(iter_jsonl(manifest))
    index = scan_audio_tree(audio_dir)
    stats = index.stats
    print(f"Scanned {audio_dir}: {stats.files} audio files in {stats.folders} folders "
          f"({stats.linked_folders} symlinked folders followed, {stats.cycles_skipped} cycles/aliases skipped, "
          f"{stats.broken_links} broken links); subsets: {', '.join(sorted(s for s in index.subsets if s)) or '-'}")
    result = fix_rows(numbered, index, audio_dir, output.parent, args.validate_audio, progress)
    counts = result.counts
    kept = result.rows
    if args.drop_unmatched:
        bad_lines = {line for line, _ in result.problems}
        kept = [row for (line, _), row in zip(numbered, result.rows) if line not in bad_lines]
    print(f"{manifest}: {counts['rows']} rows: {counts['matched']} matched ({counts['rewritten']} paths rewritten, "
          f"{counts['extension_fixed']} extensions fixed, {counts['other_subset_folder']} found in another subset "
          f"folder), {counts['unmatched']} unmatched, {counts['ambiguous']} ambiguous"
          + (f", {counts['undecodable']} undecodable" if args.validate_audio else ""))
    for line, reason in result.problems[:10]:
        print(f"  {manifest.name}:{line}: {reason}")
    if len(result.problems) > 10:
        print(f"  ... and {len(result.problems) - 10} more")
    if args.dry_run:
        print("Dry run: nothing written.")
    else:
        if output == manifest and not Path(str(manifest) + ".bak").exists():
            shutil.copy2(manifest, str(manifest) + ".bak")
        write_jsonl(output, kept)
        print(f"Wrote {len(kept)} rows to {output}" + (" (original kept as .bak)" if output == manifest else ""))
        if result.problems:
            report = Path(str(output) + ".unmatched.txt")
            report.write_text("".join(f"{manifest}:{line}: {reason}\n" for line, reason in result.problems))
            print(f"Problem rows listed in {report}")
    if result.problems:
        action = "left out of" if args.drop_unmatched and not args.dry_run else "still in"
        print(f"{len(result.problems)} row(s) have no usable audio file ({action} the manifest): extract the "
              f"missing WavCaps audio under {audio_dir} (or pass --audio-dir), remove duplicate files behind "
              "ambiguous rows "
              "or re-download undecodable ones, and run this again; or re-run with --drop-unmatched to train "
              "without them.", file=sys.stderr)
        return 0 if args.drop_unmatched and not args.dry_run else 1
    return 0


def main(argv: list[str] | None = None, prog: str = "safe data fix-wavcaps") -> int:
    from safe.core.commands import standalone

    return standalone(__name__, argv, prog, "Repair WavCaps audio paths in the manifest.")

