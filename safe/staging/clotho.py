"""`safe data prepare clotho`: the official Clotho files -> `clotho_{train,val,test}.jsonl`.

Input, as Clotho ships it: `clotho_captions_{development,validation,evaluation}.csv` (columns file_name,
caption_1..caption_5) in --csv-dir, and the audio folders `development/`, `validation/`, `evaluation/` in
--audio-dir. File names hold spaces, commas and quotes, so the CSVs are read with the csv module and every name is
kept exactly as written. development becomes train (one row per caption, like AudioCaps train), validation val
and evaluation test (one row per clip with its 5 `captions`). Audio paths are relative to the output folder (the
one resolver rule), through a link when the audio lives elsewhere; rows whose audio is missing or undecodable are
counted and listed in `<out>/prepare_clotho_report.json`, never dropped silently.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from safe.core.errors import SafeError
from safe.data.manifest import write_jsonl

# (official name, our split)
SPLITS = (("development", "train"), ("validation", "val"), ("evaluation", "test"))
CAPTION_COLUMNS = tuple(f"caption_{i}" for i in range(1, 6))


def csv_name(official: str) -> str:
    return f"clotho_captions_{official}.csv"


def read_captions(path: Path) -> list[tuple[str, list[str]]]:
    """(file name, its 5 captions) per CSV row, in file order."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in reader.fieldnames or []]
            missing = [c for c in ("file_name", *CAPTION_COLUMNS) if c not in fields]
            if missing:
                raise SafeError(f"{path} lacks the column(s) {', '.join(missing)}; a Clotho captions CSV has "
                                "file_name,caption_1,...,caption_5.")
            rows = []
            for row in reader:
                row = {(k or "").strip(): v for k, v in row.items()}
                name = row["file_name"] or ""
                captions = [(row.get(c) or "").strip() for c in CAPTION_COLUMNS]
                if not name.strip():
                    raise SafeError(f"{path}:{reader.line_num}: empty file_name; fix or remove that row.")
                if not all(captions):
                    raise SafeError(f"{path}:{reader.line_num}: {name!r} has an empty caption; Clotho rows have 5.")
                rows.append((name, captions))
    except UnicodeDecodeError as exc:
        raise SafeError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); use the official CSV "
                        "as downloaded.") from None
    return rows


def read_official(csv_dir: Path, audio_dir: Path) -> list[tuple[str, str, list[tuple[str, list[str]]]]]:
    """(official name, split, CSV rows) for every CSV present; any problem with the inputs is a SafeError here,
    before anything is written."""
    present = [(official, split) for official, split in SPLITS if (csv_dir / csv_name(official)).is_file()]
    if not present:
        raise SafeError(f"No clotho_captions_{{development,validation,evaluation}}.csv in {csv_dir}; point "
                        "--csv-dir at the official Clotho CSVs.")
    sources = []
    for official, split in present:
        if not (audio_dir / official).is_dir():
            raise SafeError(f"{csv_name(official)} needs the audio folder {audio_dir / official}, which does not "
                            "exist; point --audio-dir at the folder holding development/, validation/ and evaluation/.")
        sources.append((official, split, read_captions(csv_dir / csv_name(official))))
    return sources


def convert(sources, out: Path, prefix: str) -> tuple[dict[str, list[dict]], dict]:
    """Manifest rows per split and the report's split entries for `read_official`'s sources. `prefix` reaches the
    audio folder from `out` (see prepare.media_prefix); nothing is written here."""
    from safe.data.audio import AudioLoadError, audio_info

    manifests, report = {}, {}
    for official, split, source in sources:
        rows: list[dict] = []
        missing: list = []
        for name, captions in source:
            rel = f"{official}/{name}"
            audio_path = f"{prefix}/{rel}" if prefix else rel
            try:
                duration = round(audio_info(out / audio_path).duration, 3)
            except AudioLoadError as exc:
                missing.append({"file_name": name, "reason": "no audio file" if "does not exist" in str(exc)
                                else f"undecodable: {exc}"})
                continue
            base = {"audio_path": audio_path, "file_name": name, "duration": duration}
            if split == "train":
                rows.extend({"id": f"{name}#{k}", **base, "caption": caption}
                            for k, caption in enumerate(captions, start=1))
            else:
                rows.append({"id": name, **base, "captions": captions})
        manifests[split] = rows
        report[split] = {"source_rows": len(source), "clips": len(source) - len(missing), "written": len(rows),
                         "missing": missing}
    return manifests, report


def write_manifests(out: Path, manifests: dict[str, list[dict]]) -> dict[str, Path]:
    written = {}
    for split, rows in manifests.items():
        if rows:
            written[split] = out / f"clotho_{split}.jsonl"
            write_jsonl(written[split], rows)
    return written


def prepare_clotho(args: argparse.Namespace) -> int:
    from safe.staging.prepare import _finish, media_prefix

    csv_dir, audio_dir = Path(args.csv_dir), Path(args.audio_dir)
    if not csv_dir.is_dir():
        raise SafeError(f"--csv-dir {csv_dir} does not exist; point it at the official Clotho CSVs.")
    sources = read_official(csv_dir, audio_dir)
    out = Path(args.out) if args.out else Path(args.data_root) / "clotho"
    out.mkdir(parents=True, exist_ok=True)
    prefix = media_prefix(out, audio_dir, "audio_source")
    manifests, splits = convert(sources, out, prefix)
    written = write_manifests(out, manifests)
    for split, entry in splits.items():
        entry["manifest"] = str(written[split]) if split in written else None
    report = {"dataset": "clotho", "csv_dir": str(csv_dir), "audio_dir": str(audio_dir), "splits": splits}
    return _finish(out, "clotho", report, args.strict)


def configure(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--csv-dir", required=True,
                     help="folder with clotho_captions_{development,validation,evaluation}.csv")
    sub.add_argument("--audio-dir", required=True,
                     help="folder holding the official development/, validation/ and evaluation/ audio folders")
