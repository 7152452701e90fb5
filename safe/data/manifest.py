"""JSONL manifests: reading with file:line errors, schema checks, and the one media path resolver (DESIGN §3)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from safe.errors import SafeError


class ManifestError(SafeError):
    """A manifest that cannot be used as it is; the message names the file (and line)."""


# Required keys per manifest kind (DESIGN §3). Val/test AudioCaps and Clotho rows carry `captions` instead of
# `caption`.
REQUIRED_KEYS = {
    "audiocaps": ("id", "audio_path"),
    "clotho": ("id", "audio_path"),  # rows shaped like AudioCaps ones, without the YouTube fields
    "wavcaps": ("id", "audio_path", "caption"),
    "vqa": ("question_id", "image_path", "question", "answers"),
}


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) for every non-blank line; a malformed line is an error naming file:line."""
    path = Path(path)
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"Manifest {path} does not exist.") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{path}:{number}: malformed JSON ({exc.msg}); fix or remove that line.") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}.")
            yield number, row


def read_jsonl(path: str | Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """Write rows atomically (temp file + rename) so a crash never leaves a truncated manifest."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_row(row: dict, kind: str, where: str) -> None:
    """Raise ManifestError naming `where` (file:line) when a row misses a key its kind needs."""
    missing = [key for key in REQUIRED_KEYS[kind] if key not in row]
    if kind in ("audiocaps", "clotho") and "caption" not in row and "captions" not in row:
        missing.append("caption/captions")
    if missing:
        raise ManifestError(f"{where}: {kind} row lacks {', '.join(missing)}.")
    if kind == "vqa" and not (isinstance(row["answers"], list) and row["answers"]):
        raise ManifestError(f"{where}: vqa row needs a non-empty list of answers.")


def find_split(data_root: str | Path, dataset: str, split: str) -> Path:
    """Locate `<root>/<dataset>/<dataset>_<split>.jsonl`, also accepting `<split>.jsonl`."""
    folder = Path(data_root) / dataset
    for name in (f"{dataset}_{split}.jsonl", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    how = ("convert the official Clotho files with `safe data prepare clotho --csv-dir DIR --audio-dir DIR`"
           if dataset == "clotho" else
           "stage data with `python -m experiments.full_training.download_data` or try `make demo`")
    raise ManifestError(
        f"No {dataset} {split} manifest under {folder} (looked for {dataset}_{split}.jsonl and {split}.jsonl); {how}."
    )


def _escapes(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return False
    except ValueError:
        return True


def resolve_media_path(
    media_path: str,
    manifest_path: str | Path,
    data_root: str | Path | None = None,
    allow_outside: bool = False,
) -> Path:
    """Resolve a manifest's media path by the one rule of DESIGN §3.

    A relative path is taken against the manifest's folder; if nothing exists there but the path exists
    relative to the data root (files written by older tools), that one is used. Absolute paths and paths that
    leave the data root through `..` are refused unless `allow_outside` is set. The returned path may not
    exist (a missing file is counted by the loader, not here).
    """
    if not isinstance(media_path, str) or not media_path:
        raise ManifestError(f"{manifest_path}: empty or non-string media path {media_path!r}.")
    manifest_dir = Path(manifest_path).parent
    root = Path(data_root) if data_root is not None else manifest_dir
    raw = Path(media_path)
    if raw.is_absolute():
        if not allow_outside:
            raise ManifestError(
                f"{manifest_path}: absolute media path {media_path!r} refused; make it relative to the manifest's "
                "folder or pass --allow-outside-paths."
            )
        return raw
    root_abs = Path(os.path.abspath(root))
    candidates = [Path(os.path.abspath(manifest_dir / raw)), Path(os.path.abspath(root / raw))]
    if not allow_outside:
        inside = [c for c in candidates if not _escapes(c, root_abs)]
        if not inside:
            raise ManifestError(
                f"{manifest_path}: media path {media_path!r} escapes the data root {root}; "
                "fix the manifest or pass --allow-outside-paths."
            )
        candidates = inside
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]
