"""`safe data prepare {audiocaps,vqa,wavcaps,clotho}`: official dataset files -> the JSONL manifests of the
README's data layout.

- audiocaps: the CSVs (`audiocap_id,youtube_id,start_time,caption`) plus a folder of audio named
  `<yid>.*`, `Y<yid>.*` or `<yid>_<start>...`; full videos are cut to [start, start + 10 s] as FLAC.
- vqa: `v2_OpenEnded_mscoco_<split>2014_questions.json` + `v2_mscoco_<split>2014_annotations.json` plus the
  COCO image folders; every row keeps all 10 human answers.
- wavcaps: the per-subset `{"data": [{"id", "caption", "audio", "duration", ...}]}` JSON files plus the audio
  tree, matched file by file as `safe data fix-wavcaps` does.
- clotho: see safe.staging.clotho.

Media paths are written relative to the output folder (the one resolver rule); a media folder elsewhere is
reached through a symlink created inside the output folder. Rows whose media is missing are never dropped
silently: they are counted, printed and listed in `<out>/prepare_<dataset>_report.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, OrderedDict, defaultdict
from pathlib import Path
from typing import Any

from safe.core.errors import SafeError
from safe.data.manifest import write_jsonl

DEFAULT_DATA_ROOT = "experiments/full_training/data"
AUDIO_PREFERENCE = (".flac", ".wav", ".ogg", ".mp3")  # which file wins when one clip exists in several formats
WAVCAPS_SUBSETS = {"as_final": "AudioSet_SL", "bbc_final": "BBC_Sound_Effects", "fsd_final": "FreeSound",
                   "sb_final": "SoundBible"}


# ----------------------------------------------------------------------------------------------- shared helpers


def media_prefix(out_dir: Path, media_dir: Path, link_name: str) -> str:
    """Posix prefix that reaches `media_dir` from `out_dir`; a folder outside `out_dir` is linked in as `link_name`."""
    media_abs, out_abs = os.path.abspath(media_dir), os.path.abspath(out_dir)
    if not os.path.isdir(media_abs):
        raise SafeError(f"Media folder {media_dir} does not exist; check the path.")
    rel = os.path.relpath(media_abs, out_abs)
    if not rel.startswith(".."):
        return "" if rel == "." else Path(rel).as_posix()
    link = Path(out_abs) / link_name
    if link.is_symlink():
        if os.path.realpath(link) != os.path.realpath(media_abs):
            raise SafeError(f"{link} already links to {os.readlink(link)}, not {media_abs}; remove that link first.")
    elif link.exists():
        raise SafeError(f"{link} exists and is not a link to {media_abs}; pass the media folder inside --out or "
                        "move that entry away.")
    else:
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(media_abs, link)
        print(f"Linked {link} -> {media_abs} so manifest paths stay relative to {out_abs}")
    return link_name


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _splits(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _finish(out: Path, dataset: str, report: dict, strict: bool) -> int:
    """Write the report, print the missing rows, and decide the exit status."""
    path = out / f"prepare_{dataset}_report.json"
    path.write_text(json.dumps(report, indent=1))
    missing_total = sum(len(split["missing"]) for split in report["splits"].values())
    empty = [name for name, split in report["splits"].items() if split["written"] == 0]
    for name, split in report["splits"].items():
        reasons = Counter(item["reason"].split(":")[0] for item in split["missing"])
        extra = f"; missing {len(split['missing'])} (" + ", ".join(f"{n} {r}" for r, n in reasons.items()) + ")" \
            if split["missing"] else ""
        print(f"{dataset} {name}: {split['source_rows']} source rows -> {split['written']} manifest rows in "
              f"{split.get('manifest', '-')}{extra}")
        for item in split["missing"][:5]:
            print(f"  missing: {json.dumps(item)}")
        if len(split["missing"]) > 5:
            print(f"  ... and {len(split['missing']) - 5} more")
    if missing_total:
        print(f"{missing_total} source row(s) had no usable media; all are listed in {path}.")
    if empty:
        print(f"error: no {dataset} rows could be written for {', '.join(empty)}: check the media folder.",
              file=sys.stderr)
        return 1
    if strict and missing_total:
        print("error: --strict: some rows had no usable media.", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------------- AudioCaps


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in reader.fieldnames or []]
        missing = [c for c in columns if c not in fields]
        if missing:
            raise SafeError(f"{path} lacks the column(s) {', '.join(missing)}; an AudioCaps CSV has "
                            "audiocap_id,youtube_id,start_time,caption.")
        rows = []
        for number, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            try:
                row["start_time"] = float(row["start_time"])
            except ValueError:
                raise SafeError(f"{path}:{number}: start_time {row['start_time']!r} is not a number.") from None
            rows.append(row)
        return rows


def _find_csv(csv_dir: Path, split: str) -> Path | None:
    for name in (f"{split}.csv", f"audiocaps_{split}.csv"):
        if (csv_dir / name).is_file():
            return csv_dir / name
    return None


def _start_of(rest: str) -> float | None:
    """The start time a `<yid>_<rest>` file name carries: '30000_40000' (ms), '30.000_40.000' or '30'."""
    token = rest.split("_")[0]
    try:
        return float(token)
    except ValueError:
        return None


class AudioCapsIndex:
    """Audio files keyed by the YouTube id their name carries (`<yid>`, `Y<yid>`, `<yid>_<start>...`)."""

    def __init__(self, audio_dir: Path):
        from safe.staging.wavcaps_fix import scan_audio_tree

        self.by_key: dict[str, list[tuple[str, str]]] = defaultdict(list)  # key -> [(rel path, rest of name)]
        for files in scan_audio_tree(audio_dir).by_stem.values():
            for record in files:
                for name in {record.stem, record.stem[1:] if record.stem.startswith("Y") else record.stem}:
                    self.by_key[name].append((record.rel, ""))
                    for match in re.finditer("_", name):
                        self.by_key[name[: match.start()]].append((record.rel, name[match.end():]))

    def find(self, youtube_id: str, start: float) -> tuple[str | None, bool, str]:
        """(rel path, is an exact segment for this start, reason when none)."""
        exact, whole = [], []
        for rel, rest in self.by_key.get(youtube_id, []):
            if not rest:
                whole.append(rel)
                continue
            value = _start_of(rest)
            if value is not None and (abs(value - start) < 0.5 or abs(value / 1000.0 - start) < 0.5):
                exact.append(rel)
        rank = lambda rel: (AUDIO_PREFERENCE.index(Path(rel).suffix.lower()) if Path(rel).suffix.lower()  # noqa: E731
                            in AUDIO_PREFERENCE else len(AUDIO_PREFERENCE), rel)
        if exact:
            return sorted(set(exact), key=rank)[0], True, ""
        if whole:
            return sorted(set(whole), key=rank)[0], False, ""
        if self.by_key.get(youtube_id):
            return None, False, "no file for this start time (other segments of the video exist)"
        return None, False, "no audio file"


def _ffmpeg_to_flac(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp.flac")
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(source), "-vn", "-c:a", "flac",
                    str(temp)], check=True, timeout=600)
    os.replace(temp, target)


def cut_clip(source: Path, target: Path, start: float, seconds: float) -> None:
    """Write [start, start + seconds] of `source` to `target` as FLAC (atomic; original rate and channels)."""
    import soundfile as sf

    with sf.SoundFile(str(source)) as handle:
        rate = handle.samplerate
        handle.seek(min(int(round(start * rate)), handle.frames))
        data = handle.read(frames=int(round(seconds * rate)), dtype="float32", always_2d=True)
    if len(data) == 0:
        raise ValueError("no samples in the requested window")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.tmp")
    sf.write(str(temp), data, rate, format="FLAC", subtype="PCM_16")
    os.replace(temp, target)


def _clip_audio(out: Path, prefix: str, audio_dir: Path, rel: str, exact: bool, split: str, youtube_id: str,
                start: float, clip_seconds: float, counts: Counter) -> tuple[str | None, str]:
    """Manifest path for one clip (cutting a full video when needed), or (None, reason)."""
    from safe.data.audio import AudioLoadError, audio_info

    source = audio_dir / rel
    clip_name = f"{youtube_id}_{int(round(start * 1000))}.flac"
    target = out / "audio" / split / clip_name
    if target.is_file() and target.resolve() != source.resolve():
        counts["already_cut"] += 1  # a re-run: the clip was cut before
        return f"audio/{split}/{clip_name}", ""
    try:
        info = audio_info(source)
    except AudioLoadError as exc:
        if not shutil.which("ffmpeg"):
            return None, f"undecodable: {exc} (install ffmpeg or convert it to FLAC/WAV)"
        decoded = out / "audio" / split / ".decoded" / (Path(rel).stem + ".flac")
        try:
            if not decoded.is_file():
                _ffmpeg_to_flac(source, decoded)
            info, source = audio_info(decoded), decoded
            counts["converted_with_ffmpeg"] += 1
        except (subprocess.SubprocessError, OSError, AudioLoadError) as exc2:
            return None, f"undecodable: {exc2}"
    long_file = info.duration > clip_seconds + 0.5
    if exact or not long_file:
        if source == audio_dir / rel:
            return _join(prefix, rel), ""
        return Path(os.path.relpath(source, out)).as_posix(), ""
    if start >= info.duration - 0.5:
        return None, f"start_time beyond the end: start {start:g} s, file lasts {info.duration:.1f} s"
    try:
        cut_clip(source, target, start, clip_seconds)
    except Exception as exc:  # a corrupt frame mid-file: the row is listed, not silently kept
        return None, f"undecodable: {exc}"
    counts["cut"] += 1
    return f"audio/{split}/{clip_name}", ""


def prepare_audiocaps(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    csv_dir, audio_dir = Path(args.csv_dir), Path(args.audio_dir)
    out = Path(args.out) if args.out else Path(args.data_root) / "audiocaps"
    out.mkdir(parents=True, exist_ok=True)
    splits = _splits(args.splits) if args.splits else [s for s in ("train", "val", "test") if _find_csv(csv_dir, s)]
    if not splits:
        raise SafeError(f"No train.csv, val.csv or test.csv in {csv_dir}; point --csv-dir at the AudioCaps CSVs.")
    prefix = media_prefix(out, audio_dir, "audio_source")
    audio_dir = out / prefix if prefix else out  # scan through the link so paths stay lexical
    index = AudioCapsIndex(audio_dir)
    report: dict[str, Any] = {"dataset": "audiocaps", "csv_dir": str(csv_dir), "audio_dir": str(args.audio_dir),
                              "splits": {}}
    counts: Counter = Counter()
    for split in splits:
        path = _find_csv(csv_dir, split)
        if path is None:
            raise SafeError(f"No {split}.csv in {csv_dir}; drop {split} from --splits or add the file.")
        source_rows = _read_csv(path, ("audiocap_id", "youtube_id", "start_time", "caption"))
        clips: OrderedDict = OrderedDict()  # (yid, start) -> rows, in CSV order
        for row in source_rows:
            clips.setdefault((row["youtube_id"], row["start_time"]), []).append(row)
        rows: list[dict] = []
        missing: list = []
        for (youtube_id, start), group in tqdm(clips.items(), desc=f"audiocaps {split}", unit="clip",
                                               disable=not sys.stderr.isatty(), leave=False):
            rel, exact, reason = index.find(youtube_id, start)
            audio_path = None
            if rel is not None:
                audio_path, reason = _clip_audio(out, prefix, audio_dir, rel, exact, split, youtube_id, start,
                                                 args.clip_seconds, counts)
            if audio_path is None:
                missing.extend({"audiocap_id": r["audiocap_id"], "youtube_id": youtube_id, "start_time": start,
                                "reason": reason} for r in group)
                continue
            base = {"audio_path": audio_path, "youtube_id": youtube_id, "start_time": start}
            if split == "train":
                rows.extend({"id": r["audiocap_id"], **base, "caption": r["caption"]} for r in group)
            else:
                rows.append({"id": f"{youtube_id}_{int(round(start * 1000))}", **base,
                             "captions": [r["caption"] for r in group],
                             "audiocap_ids": [r["audiocap_id"] for r in group]})
        manifest = out / f"audiocaps_{split}.jsonl"
        if rows:
            write_jsonl(manifest, rows)
        report["splits"][split] = {"source_rows": len(source_rows), "clips": len(clips), "written": len(rows),
                                   "manifest": str(manifest) if rows else None, "missing": missing}
    report["counts"] = dict(counts)
    if counts:
        print("audio: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counts.items())))
    return _finish(out, "audiocaps", report, args.strict)


# ---------------------------------------------------------------------------------------------------------- VQA


def _find_one(root: Path, names: list[str]) -> Path | None:
    for name in names:
        if (root / name).is_file():
            return root / name
    for name in names:
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    return None


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise SafeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); download it again.") from None


def _image_folder(images_dir: Path, subtype: str) -> tuple[Path, str]:
    """The folder holding COCO_<subtype>_*.jpg and its path relative to images_dir."""
    for rel in (subtype, f"images/{subtype}", ""):
        folder = images_dir / rel if rel else images_dir
        if folder.is_dir() and any(name.startswith(f"COCO_{subtype}_") for name in _names(folder)):
            return folder, rel
    return images_dir / subtype, subtype


_NAME_CACHE: dict[str, set[str]] = {}


def _names(folder: Path) -> set[str]:
    key = str(folder)
    if key not in _NAME_CACHE:
        _NAME_CACHE[key] = {entry.name for entry in os.scandir(folder)} if folder.is_dir() else set()
    return _NAME_CACHE[key]


def prepare_vqa(args: argparse.Namespace) -> int:
    questions_dir, images_dir = Path(args.questions_dir), Path(args.images_dir)
    out = Path(args.out) if args.out else Path(args.data_root) / "vqa"
    out.mkdir(parents=True, exist_ok=True)
    prefix = media_prefix(out, images_dir, "images")
    report: dict[str, Any] = {"dataset": "vqa", "questions_dir": str(questions_dir), "images_dir": str(images_dir),
                              "splits": {}}
    for split in _splits(args.splits):
        subtypes = [f"{split}2014", split]
        qfile = _find_one(questions_dir, [f"v2_OpenEnded_mscoco_{s}_questions.json" for s in subtypes])
        afile = _find_one(questions_dir, [f"v2_mscoco_{s}_annotations.json" for s in subtypes])
        if qfile is None or afile is None:
            raise SafeError(f"No VQA v2 {split} questions/annotations under {questions_dir} (expected "
                            f"v2_OpenEnded_mscoco_{split}2014_questions.json and "
                            f"v2_mscoco_{split}2014_annotations.json).")
        questions = _load_json(qfile)
        annotations = {a["question_id"]: a for a in _load_json(afile).get("annotations", [])}
        subtype = questions.get("data_subtype") or f"{split}2014"
        folder, folder_rel = _image_folder(images_dir, subtype)
        rows, missing, odd_answers = [], [], 0
        for question in questions.get("questions", []):
            qid = question["question_id"]
            ann = annotations.get(qid)
            if ann is None:
                missing.append({"question_id": qid, "reason": "no annotation"})
                continue
            name = f"COCO_{subtype}_{int(question['image_id']):012d}.jpg"
            if name not in _names(folder):
                missing.append({"question_id": qid, "image_id": question["image_id"], "reason": f"no image {name}"})
                continue
            answers = [a["answer"] for a in ann.get("answers", [])]
            odd_answers += len(answers) != 10
            rows.append({"question_id": qid, "image_id": question["image_id"],
                         "image_path": _join(prefix, _join(folder_rel, name)), "question": question["question"],
                         "answers": answers, "multiple_choice_answer": ann.get("multiple_choice_answer"),
                         "answer_type": ann.get("answer_type"), "question_type": ann.get("question_type")})
        manifest = out / f"vqa_{split}.jsonl"
        if rows:
            write_jsonl(manifest, rows)
        if odd_answers:
            print(f"warning: {odd_answers} {split} question(s) do not have exactly 10 answers.")
        report["splits"][split] = {"source_rows": len(questions.get("questions", [])), "written": len(rows),
                                   "manifest": str(manifest) if rows else None, "missing": missing}
    return _finish(out, "vqa", report, args.strict)


# ------------------------------------------------------------------------------------------------------ WavCaps


def _wavcaps_files(args: argparse.Namespace) -> list[Path]:
    if args.json:
        files = [Path(p) for p in _splits(args.json)]
    elif args.json_dir:
        files = sorted(Path(args.json_dir).rglob("*.json"))
    else:
        raise SafeError("Give --json FILE[,FILE...] or --json-dir DIR with the WavCaps metadata JSON files.")
    for path in files:
        if not path.is_file():
            raise SafeError(f"WavCaps metadata file {path} does not exist.")
    return files


def _subset_name(path: Path, json_dir: str | None) -> str:
    if path.stem in WAVCAPS_SUBSETS:
        return WAVCAPS_SUBSETS[path.stem]
    if json_dir and path.parent.resolve() != Path(json_dir).resolve():
        return path.parent.name
    return path.stem


def prepare_wavcaps(args: argparse.Namespace) -> int:
    from safe.staging.wavcaps_fix import fix_rows, scan_audio_tree

    out = Path(args.out) if args.out else Path(args.data_root) / "wavcaps"
    out.mkdir(parents=True, exist_ok=True)
    audio_dir = Path(args.audio_dir) if args.audio_dir else out / "audio"
    prefix = media_prefix(out, audio_dir, "audio")
    scan_root = out / prefix if prefix else out
    rows, skipped_files, seen_ids = [], [], set()
    for path in _wavcaps_files(args):
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            skipped_files.append(str(path))  # e.g. the blacklist JSON that ships beside the metadata
            continue
        subset = _subset_name(path, args.json_dir)
        for entry in data["data"]:
            if "caption" not in entry or "id" not in entry:
                continue
            stem = Path(str(entry["id"])).stem
            row_id = stem if stem not in seen_ids else f"{subset}/{stem}"  # ids may repeat across subsets
            seen_ids.add(row_id)
            audio = str(entry.get("audio") or "")
            guess = audio if audio and audio != "wav_path" else f"{subset}/{stem}.wav"
            rows.append({"id": row_id, "audio_path": guess, "caption": entry["caption"], "subset": subset,
                         "duration": entry.get("duration")})
    if skipped_files:
        print(f"Skipped {len(skipped_files)} JSON file(s) without a 'data' list: {', '.join(skipped_files)}")
    if not rows:
        raise SafeError("The WavCaps JSON files hold no rows; pass the *_final.json metadata files.")
    index = scan_audio_tree(scan_root)
    result = fix_rows(list(enumerate(rows, start=1)), index, scan_root, out)
    bad = {number: reason for number, reason in result.problems}
    kept = [row for number, row in enumerate(result.rows, start=1) if number not in bad]
    missing = [{"id": rows[number - 1]["id"], "subset": rows[number - 1]["subset"], "reason": reason}
               for number, reason in bad.items()]
    manifest = out / "wavcaps_train.jsonl"
    if kept:
        write_jsonl(manifest, kept)
    report = {"dataset": "wavcaps", "audio_dir": str(audio_dir), "counts": dict(result.counts),
              "splits": {"train": {"source_rows": len(rows), "written": len(kept),
                                   "manifest": str(manifest) if kept else None, "missing": missing}}}
    return _finish(out, "wavcaps", report, args.strict)


# ------------------------------------------------------------------------------------------------- command line


def configure(parser: argparse.ArgumentParser) -> None:
    kinds = parser.add_subparsers(dest="prepare_kind", required=True)

    def common(sub: argparse.ArgumentParser, dataset: str) -> None:
        sub.add_argument("--out", help=f"output folder (default: <data-root>/{dataset})")
        sub.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=f"data root (default: {DEFAULT_DATA_ROOT})")
        sub.add_argument("--strict", action="store_true", help="exit non-zero when any row's media is missing")

    audiocaps = kinds.add_parser("audiocaps", help="AudioCaps CSVs + audio folder -> audiocaps_*.jsonl")
    audiocaps.add_argument("--csv-dir", required=True, help="folder with train.csv, val.csv, test.csv")
    audiocaps.add_argument("--audio-dir", required=True, help="folder with the audio (any layout, any of "
                           "<yid>.*, Y<yid>.*, <yid>_<start>...)")
    audiocaps.add_argument("--splits", help="comma-separated splits (default: those with a CSV)")
    audiocaps.add_argument("--clip-seconds", type=float, default=10.0, help="clip cut from full videos (default 10)")
    common(audiocaps, "audiocaps")
    vqa = kinds.add_parser("vqa", help="VQA v2 questions/annotations JSON + COCO images -> vqa_*.jsonl")
    vqa.add_argument("--questions-dir", "--json-dir", dest="questions_dir", required=True,
                     help="folder with the v2_*questions.json and v2_*annotations.json files")
    vqa.add_argument("--images-dir", required=True, help="folder with train2014/ and val2014/ COCO images")
    vqa.add_argument("--splits", default="train,val", help="comma-separated splits (default: train,val)")
    common(vqa, "vqa")
    wavcaps = kinds.add_parser("wavcaps", help="WavCaps metadata JSON + audio tree -> wavcaps_train.jsonl")
    wavcaps.add_argument("--json", help="comma-separated metadata JSON files (e.g. fsd_final.json)")
    wavcaps.add_argument("--json-dir", help="folder searched for metadata JSON files")
    wavcaps.add_argument("--audio-dir", help="audio tree with one folder per subset (default: <out>/audio)")
    common(wavcaps, "wavcaps")
    from safe.staging import clotho

    clotho_parser = kinds.add_parser("clotho", help="Clotho captions CSVs + audio folders -> clotho_*.jsonl")
    clotho.configure(clotho_parser)
    common(clotho_parser, "clotho")


def run(args: argparse.Namespace) -> int:
    if args.prepare_kind == "clotho":
        from safe.staging.clotho import prepare_clotho

        return prepare_clotho(args)
    return {"audiocaps": prepare_audiocaps, "vqa": prepare_vqa, "wavcaps": prepare_wavcaps}[args.prepare_kind](args)
