"""JSONL manifests: reading with file:line errors, schema checks, and the one media path resolver."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from safe.core.errors import SafeError
from safe.core.files import atomic_write
from safe.data.row_checks import ManifestRules, field_problems, missing_keys


class ManifestError(SafeError):
    """A manifest that cannot be used as it is; the message names the file (and line)."""




def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row) for every non-blank line; a malformed line is an error naming file:line."""
    path = Path(path)
    try:
        handle = open(path, "rb")  # decoded line by line, so a bad byte is reported with its line
    except FileNotFoundError:
        raise ManifestError(f"Manifest {path} does not exist.") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark is harmless
            except UnicodeDecodeError as exc:
                raise ManifestError(f"{path}:{number}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at column "
                                    f"{exc.start + 1}); re-save the manifest as UTF-8.") from None
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
    """Write rows atomically (safe.core.files: temp file + rename, the file-mode policy, a full disk as one sentence)
    so a crash never leaves a truncated manifest."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")

    atomic_write(path, write)


def check_row(row: dict, kind: str, where: str) -> None:
    """Raise ManifestError naming `where` (file:line) when a row misses a key its kind needs or a field has the
    wrong type (safe.data.row_checks)."""
    missing = missing_keys(row, kind)
    if missing:
        raise ManifestError(f"{where}: {kind} row lacks {', '.join(missing)}.")
    problems = field_problems(row, kind)
    if problems:
        raise ManifestError(f"{where}: {'; '.join(problems)}.")


class RowChecker:
    """check_row plus the rules across the rows of one manifest (unique ids, one file per val/test clip); call
    it on every row in file order."""

    def __init__(self, kind: str, split: str, path: str | Path):
        self.kind, self.path = kind, path
        self.rules = ManifestRules(kind, split)

    def __call__(self, number: int, row: dict) -> None:
        where = f"{self.path}:{number}"
        check_row(row, self.kind, where)
        problem = self.rules.problem(row, number)
        if problem:
            raise ManifestError(f"{where}: {problem}.")


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
    """Resolve a manifest's media path by the one rule every tool uses.

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
