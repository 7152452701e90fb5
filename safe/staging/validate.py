"""`safe data validate --data-root DIR [--blacklist FILE]`: check a whole data root before a GPU is touched.

Per manifest: it parses, every row has its keys, every media path resolves (the one resolver) to an existing
file, a seeded sample decodes through the real loaders, AudioCaps val/test clips carry their references and
VQA rows their 10 answers. Across manifests: leakage, i.e. a clip in AudioCaps train and val/test, a VQA
question or image in both splits, or a WavCaps clip that is an AudioCaps val/test clip (by YouTube id, by
file, or listed in a --blacklist file such as WavCaps' own blacklist JSON). Exit status 0 only when clean.
"""

from __future__ import annotations

import argparse
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from safe.core.errors import SafeError
from safe.data.leakage import banned_keys, read_blacklist, wavcaps_row_is_banned
from safe.data.manifest import ManifestError, find_split, iter_jsonl, resolve_media_path
from safe.data.row_checks import ManifestRules, field_problems, missing_keys

# (dataset, split, required). WavCaps is optional, AudioCaps test too.
EXPECTED = [("audiocaps", "train", True), ("audiocaps", "val", True), ("audiocaps", "test", False),
            ("vqa", "train", True), ("vqa", "val", True), ("wavcaps", "train", False),
            ("clotho", "train", False), ("clotho", "val", False), ("clotho", "test", False)]
MEDIA_KEY = {"audiocaps": "audio_path", "wavcaps": "audio_path", "vqa": "image_path", "clotho": "audio_path"}
CAPTIONED = ("audiocaps", "clotho")  # datasets whose val/test clips carry several references


# ---------------------------------------------------------------------------------------- layout (download report)


def _official_hints(folder: Path, dataset: str) -> list[str]:
    """Commands that would turn official files found in `folder` into manifests."""
    if not folder.is_dir():
        return []
    names = {p.name for p in folder.rglob("*") if p.suffix in (".csv", ".json")} if dataset != "vqa" else \
        {p.name for p in folder.rglob("v2_*.json")}
    if dataset == "audiocaps" and {"train.csv", "val.csv"} & names:
        return [f"safe data prepare audiocaps --csv-dir DIR_WITH_CSVS --audio-dir DIR_WITH_AUDIO --out {folder}"]
    if dataset == "vqa" and any(n.endswith("_questions.json") for n in names):
        return [f"safe data prepare vqa --questions-dir {folder} --images-dir {folder} --out {folder}"]
    if dataset == "wavcaps" and any(n.endswith("_final.json") for n in names):
        return [f"safe data prepare wavcaps --json-dir {folder} --audio-dir {folder / 'audio'} --out {folder}"]
    if dataset == "clotho" and any(n.startswith("clotho_captions_") for n in names):
        return [f"safe data prepare clotho --csv-dir {folder} --audio-dir {folder} --out {folder}"]
    return []


def layout_report(root: str | Path, wanted: set[str] | None = None) -> tuple[list[str], list[str]]:
    """Lines describing which §3 manifests exist (with row counts) and a list of what is missing."""
    root = Path(root)
    lines, missing = [f"Data root {root.resolve()}:"], []
    for dataset, split, required in EXPECTED:
        try:
            path = find_split(root, dataset, split)
        except ManifestError:
            # WavCaps counts as missing only when the user asked for it; AudioCaps test is always optional.
            needed = required or (dataset == "wavcaps" and wanted is not None and dataset in wanted)
            if needed:
                missing.append(f"{dataset}/{dataset}_{split}.jsonl")
                lines.append(f"  MISSING {dataset}/{dataset}_{split}.jsonl")
            else:
                lines.append(f"  absent  {dataset}/{dataset}_{split}.jsonl (optional)")
            continue
        try:
            rows = sum(1 for _ in iter_jsonl(path))
            lines.append(f"  ok      {path.relative_to(root)}: {rows} rows")
        except ManifestError as exc:
            lines.append(f"  BROKEN  {path.relative_to(root)}: {exc}")
            missing.append(str(path.relative_to(root)))
    for dataset in ("audiocaps", "vqa", "wavcaps", "clotho"):
        absent_clotho = dataset == "clotho" and not (root / "clotho" / "clotho_test.jsonl").is_file()
        if any(m.startswith(dataset + "/") for m in missing) or absent_clotho:
            for hint in _official_hints(root / dataset, dataset):
                lines.append(f"  hint: official {dataset} files found; convert them with: {hint}")
    if missing:
        lines.append("Still missing: " + ", ".join(missing) + "; stage or convert them (`safe data prepare ...`), "
                     f"then run `safe data validate --data-root {root}` before training.")
    else:
        lines.append(f"All manifests present; run `safe data validate --data-root {root}` to check them.")
    return lines, missing


# -------------------------------------------------------------------------------------------------- validation


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@dataclass
class Loaded:
    dataset: str
    split: str
    path: Path
    rows: list[tuple[int, dict]]
    media: dict[str, Path] = field(default_factory=dict)  # resolved media path (str) -> lexical Path, existing only


def _limited(items: list[str], limit: int = 5) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")


def _check_manifest(root: Path, dataset: str, split: str, path: Path, args, report: Report) -> Loaded | None:
    try:
        rows = list(iter_jsonl(path))
    except ManifestError as exc:
        report.errors.append(str(exc))
        return None
    rel = path.relative_to(root)
    if not rows:
        report.errors.append(f"{rel} has no rows: the {dataset} {split} split is empty.")
        return None
    loaded = Loaded(dataset, split, path, [])  # rows whose fields are sound: the leakage checks read them
    bad_rows: list = []
    missing: list = []
    content: list = []
    referenced: set = set()
    rules = ManifestRules(dataset, split)
    for number, row in rows:
        where = f"{rel}:{number}"
        lacking = missing_keys(row, dataset)
        if lacking:
            bad_rows.append(f"{where}: {dataset} row lacks {', '.join(lacking)}.")
            continue
        problems = field_problems(row, dataset)
        if problems:
            content.extend(f"{where}: {problem}" for problem in problems)
            continue
        clash = rules.problem(row, number)
        if clash:
            content.append(f"{where}: {clash}")
        loaded.rows.append((number, row))
        try:
            media = resolve_media_path(row[MEDIA_KEY[dataset]], path, root, args.allow_outside_paths)
        except ManifestError as exc:
            bad_rows.append(str(exc))
            continue
        referenced.add(str(media))
        if media.is_file():
            loaded.media[str(media)] = media
            row["_media"] = str(media)
        else:
            missing.append(f"{where}: {row[MEDIA_KEY[dataset]]}")
        content.extend(_content_problems(dataset, split, row, where))
    if bad_rows:
        report.errors.append(f"{rel}: {len(bad_rows)} malformed row(s): {_limited(bad_rows)}")
    if missing:
        hint = " (run `safe data fix-wavcaps --wavcaps-dir ...`)" if dataset == "wavcaps" else ""
        report.errors.append(f"{rel}: {len(missing)} of {len(rows)} row(s) point at missing media{hint}: "
                             f"{_limited(missing)}")
    if content:
        report.errors.append(f"{rel}: {len(content)} row(s) with bad content: {_limited(content)}")
    decoded, failures = _decode_sample(dataset, sorted(loaded.media), args)
    if failures:
        report.errors.append(f"{rel}: {len(failures)} of {decoded + len(failures)} sampled media failed to decode: "
                             f"{_limited(failures)}")
    clips = len({(r.get("youtube_id"), r.get("start_time")) if r.get("youtube_id") else r.get("_media")
                 for _, r in loaded.rows}) if dataset in CAPTIONED else None
    report.lines.append(f"  {rel}: {len(rows)} rows" + (f", {clips} clips" if clips is not None else "")
                        + f", media {len(loaded.media)}/{len(referenced)} present, "
                          f"{decoded}/{decoded + len(failures)} sampled decoded")
    if dataset in CAPTIONED and split != "train":
        _check_references(rows, rel, report)
    return loaded


def _content_problems(dataset: str, split: str, row: dict, where: str) -> list[str]:
    """What training accepts but a standard data set never has (field types are safe.data.row_checks' job)."""
    if dataset == "vqa" and len(row["answers"]) != 10:
        return [f"{where}: expected 10 answer strings, got {len(row['answers'])}"]
    return []


def _check_references(rows: list[tuple[int, dict]], rel: Path, report: Report) -> None:
    """Val/test clips need their references (grouped by clip as the dataset does); fewer than 5 is unusual."""
    groups: OrderedDict = OrderedDict()
    for _, row in rows:
        key = tuple(v if isinstance(v, (str, int, float, type(None))) else repr(v)  # rows of any content
                    for v in (row.get("youtube_id", row.get("audio_path")), row.get("start_time")))
        captions = row.get("captions")
        refs = captions if isinstance(captions, list) else [row.get("caption")]
        groups.setdefault(key, []).extend(r for r in refs if isinstance(r, str) and r.strip())
    counts = [len(refs) for refs in groups.values()]
    without = sum(1 for c in counts if c == 0)
    if without:
        report.errors.append(f"{rel}: {without} clip(s) have no reference caption.")
    few = sum(1 for c in counts if 0 < c < 5)
    if few:
        report.warnings.append(f"{rel}: {few} of {len(counts)} clips have fewer than 5 references "
                               "(AudioCaps and Clotho have 5; metrics are computed against what is there).")


def _decode_sample(dataset: str, media: list[str], args) -> tuple[int, list[str]]:
    if not media or args.sample <= 0:
        return 0, []
    chosen = random.Random(args.seed).sample(media, min(args.sample, len(media)))
    ok, failures = 0, []
    for path in chosen:
        try:
            if dataset == "vqa":
                from safe.data.images import load_image

                load_image(path)
            else:
                from safe.data.audio import load_audio

                load_audio(path, 16000, 10.0)
            ok += 1
        except SafeError as exc:
            failures.append(str(exc))
    return ok, failures


# ---------------------------------------------------------------------------------------------------- leakage


def _audiocaps_clip(row: dict):
    if row.get("youtube_id"):
        return ("yt", str(row["youtube_id"]), round(float(row.get("start_time") or 0.0), 2))
    return ("file", os.path.realpath(row["_media"])) if row.get("_media") else None


def _show_clip(clip: tuple) -> str:
    return f"youtube {clip[1]} at {clip[2]:g} s" if clip[0] == "yt" else f"file {clip[1]}"


def check_leakage(sets: dict[tuple[str, str], Loaded], blacklist: set[str] | None, report: Report) -> None:
    def realfiles(loaded: Loaded) -> set[str]:
        return {os.path.realpath(p) for p in loaded.media}

    train = sets.get(("audiocaps", "train"))
    held = [sets[k] for k in (("audiocaps", "val"), ("audiocaps", "test")) if k in sets]
    if train:
        train_clips = {_audiocaps_clip(r) for _, r in train.rows} - {None}
        train_files = realfiles(train)
        for other in held:
            clips = {_audiocaps_clip(r) for _, r in other.rows} - {None}
            shared = sorted(_show_clip(clip) for clip in train_clips & clips)
            same_files = sorted(train_files & realfiles(other))
            if shared or same_files:
                report.errors.append(f"leakage: {len(shared)} clip(s) and {len(same_files)} audio file(s) are in "
                                     f"audiocaps train and {other.split}: {_limited(shared + same_files)}")
    ctrain = sets.get(("clotho", "train"))
    if ctrain:
        for other in (sets[k] for k in (("clotho", "val"), ("clotho", "test")) if k in sets):
            shared = sorted(realfiles(ctrain) & realfiles(other))
            if shared:
                report.errors.append(f"leakage: {len(shared)} audio file(s) are in clotho train and {other.split}: "
                                     f"{_limited(shared)}")
    vtrain, vval = sets.get(("vqa", "train")), sets.get(("vqa", "val"))
    if vtrain and vval:
        qids = sorted({r["question_id"] for _, r in vtrain.rows} & {r["question_id"] for _, r in vval.rows}, key=str)
        images = sorted(realfiles(vtrain) & realfiles(vval))
        if qids or images:
            report.errors.append(f"leakage: {len(qids)} question id(s) and {len(images)} image(s) are in vqa train "
                                 f"and val: {_limited([str(q) for q in qids] + images)}")
    wavcaps = sets.get(("wavcaps", "train"))
    if wavcaps:
        held_files = set().union(*(realfiles(loaded) for loaded in held)) if held else set()
        banned = banned_keys((r.get("youtube_id") for loaded in held for _, r in loaded.rows), blacklist)
        hits = []
        for number, row in wavcaps.rows:
            if wavcaps_row_is_banned(row, banned) or (
                    row.get("_media") and os.path.realpath(row["_media"]) in held_files):
                hits.append(f"{wavcaps.path.name}:{number} ({row.get('id')})")
        if hits:
            report.errors.append(f"leakage: {len(hits)} WavCaps row(s) are AudioCaps val/test clips"
                                 + (" or blacklisted" if blacklist else "")
                                 + f"; drop them from wavcaps_train.jsonl: {_limited(hits)}")


# ------------------------------------------------------------------------------------------------- command line


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", required=True, help="the data root (the README's data layout)")
    parser.add_argument("--blacklist", help="ids/YouTube ids WavCaps must not contain (text, JSON list, or "
                        "WavCaps' blacklist JSON)")
    parser.add_argument("--sample", type=int, default=16, help="media files decoded per manifest (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="which files are decoded")
    parser.add_argument("--allow-outside-paths", action="store_true",
                        help="accept absolute paths and paths leaving the data root")


def validate(root: Path, args) -> Report:
    report = Report()
    sets: dict[tuple[str, str], Loaded] = {}
    for dataset, split, required in EXPECTED:
        try:
            path = find_split(root, dataset, split)
        except ManifestError as exc:
            (report.errors if required else report.lines).append(
                str(exc) if required else f"  ({dataset} {split}: not present, optional)")
            continue
        loaded = _check_manifest(root, dataset, split, path, args, report)
        if loaded:
            sets[(dataset, split)] = loaded
    blacklist = read_blacklist(Path(args.blacklist)) if args.blacklist else None
    check_leakage(sets, blacklist, report)
    if not report.errors:
        applied = f" (blacklist of {len(blacklist)} ids applied)" if blacklist else ""
        report.lines.append("  leakage: none found" + applied)
    return report


def run(args: argparse.Namespace) -> int:
    root = Path(args.data_root)
    if not root.is_dir():
        raise SafeError(f"Data root {root} does not exist; stage data with `python -m "
                        "experiments.full_training.download_data` or try `make demo`.")
    report = validate(root, args)
    print(f"Data root {root.resolve()}:")
    print("\n".join(report.lines))
    for warning in report.warnings:
        print(f"warning: {warning}")
    for error in report.errors:
        print(f"ERROR: {error}")
    if report.errors:
        print(f"NOT READY: {len(report.errors)} problem(s) above; fix them before training.")
        return 1
    print("READY: every manifest parses, media exist, sampled media decode, no leakage.")
    return 0
