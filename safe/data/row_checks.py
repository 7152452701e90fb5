"""What a manifest row must hold: its keys, the type of every field, and the rules across the rows of one
manifest (unique ids, one audio file per val/test clip).

The functions return problem sentences without the file:line prefix; the callers decide whether a problem stops
the load (the datasets, through manifest.RowChecker) or is listed with the others (`safe data validate`).
"""

from __future__ import annotations

import math
import os

# Required keys per manifest kind. Val/test AudioCaps and Clotho rows carry `captions` (all references) instead of
# `caption`; Clotho rows are shaped like AudioCaps ones, without the YouTube fields.
REQUIRED_KEYS = {
    "audiocaps": ("id", "audio_path"),
    "clotho": ("id", "audio_path"),
    "wavcaps": ("id", "audio_path", "caption"),
    "vqa": ("question_id", "image_path", "question", "answers"),
}


CAPTIONED = ("audiocaps", "clotho")  # one row per caption in train, or one row per clip with all its captions


def _is_id(value) -> bool:
    # Ids become JSON keys and file names; a float or a boolean id would collide with an integer one.
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(value.strip()))


def _is_text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# (test, what a good value is) per field; a field absent from a row is only checked by REQUIRED_KEYS.
_ID = (_is_id, "a non-empty string or an integer")
_PATH = (_is_text, "a non-empty string (a path relative to the manifest)")
_TEXT = (_is_text, "a non-empty string")
_TEXTS = (lambda v: isinstance(v, list) and bool(v) and all(_is_text(c) for c in v),
          "a non-empty list of non-empty strings")
_STRINGS = (lambda v: isinstance(v, list) and bool(v) and all(isinstance(a, str) for a in v),
            "a non-empty list of strings")
_NUMBER_OR_NULL = (lambda v: v is None or _is_number(v), "a number (or null)")
_STRING_OR_NULL = (lambda v: v is None or isinstance(v, str), "a string (or null)")
_ID_OR_NULL = (lambda v: v is None or _is_id(v), "a non-empty string or an integer (or null)")

FIELDS = {
    "audiocaps": {"id": _ID, "audio_path": _PATH, "youtube_id": _TEXT, "start_time": _NUMBER_OR_NULL,
                  "caption": _TEXT, "captions": _TEXTS},
    "clotho": {"id": _ID, "audio_path": _PATH, "caption": _TEXT, "captions": _TEXTS},
    "wavcaps": {"id": _ID, "audio_path": _PATH, "caption": _TEXT, "subset": _STRING_OR_NULL,
                "duration": _NUMBER_OR_NULL},
    "vqa": {"question_id": _ID, "image_path": _PATH, "question": _TEXT, "answers": _STRINGS,
            "multiple_choice_answer": _STRING_OR_NULL, "answer_type": _STRING_OR_NULL,
            "question_type": _STRING_OR_NULL, "image_id": _ID_OR_NULL},
}


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def missing_keys(row: dict, kind: str) -> list[str]:
    missing = [key for key in REQUIRED_KEYS[kind] if key not in row]
    if kind in CAPTIONED and "caption" not in row and "captions" not in row:
        missing.append("caption/captions")
    return missing


def field_problems(row: dict, kind: str) -> list[str]:
    """One sentence per present field whose value has the wrong type or is empty."""
    problems = []
    for key, (test, good) in FIELDS[kind].items():
        if key in row and not test(row[key]):
            problems.append(f"{key} must be {good}, not {_shown(row[key])}")
    return problems


class ManifestRules:
    """The rules across the rows of one manifest, fed row by row in file order.

    - Ids are unique: VQA question ids, WavCaps ids within a subset, and the ids of AudioCaps rows that hold a
      whole clip (`captions`). Rows with one `caption` each may repeat their clip's id, but only for that same clip.
    - In val/test AudioCaps, rows that share youtube_id + start_time are one clip (their references are grouped),
      so they must point at one audio file.
    Ids are compared as text: 7 and "7" are the same id once written to a predictions file.
    """

    def __init__(self, kind: str, split: str):
        self.kind, self.split = kind, split
        self.ids: dict = {}  # id -> (line, clip identity, row holds a whole clip)
        self.clips: dict[tuple, tuple[int, str]] = {}  # (youtube_id, start_time) -> (line, audio_path)

    def problem(self, row: dict, line: int) -> str | None:
        """The sentence for this row's clash with an earlier row, or None. Call after field_problems passed."""
        return self._id_problem(row, line) or self._clip_problem(row, line)

    def _id_problem(self, row: dict, line: int) -> str | None:
        key = "question_id" if self.kind == "vqa" else "id"
        value = row[key]
        whole = self.kind not in CAPTIONED or "captions" in row
        identity: tuple = ((_norm(row.get("audio_path")), row.get("youtube_id"), _start(row)) if self.kind in CAPTIONED
                    else ())
        # WavCaps ids are only unique within a subset (FreeSound and SoundBible both have a clip "1").
        name = (row.get("subset"), str(value)) if self.kind == "wavcaps" else str(value)
        seen = self.ids.get(name)
        if seen is None:
            self.ids[name] = (line, identity, whole)
            return None
        first, first_identity, first_whole = seen
        if whole or first_whole:
            within = f" in subset {row.get('subset')}" if self.kind == "wavcaps" and row.get("subset") else ""
            return f"{key} {value!r} repeats line {first}{within}; ids must be unique"
        if identity != first_identity:
            return (f"{key} {value!r} names another clip at line {first} ({first_identity[0]}, not {identity[0]}); "
                    "one id is one clip")
        return None

    def _clip_problem(self, row: dict, line: int) -> str | None:
        if self.kind != "audiocaps" or self.split == "train" or not row.get("youtube_id"):
            return None
        clip = (str(row["youtube_id"]), _start(row))
        path = _norm(row["audio_path"])
        seen = self.clips.setdefault(clip, (line, path))
        if seen[1] == path:
            return None
        start = f" at {clip[1]:g} s" if clip[1] is not None else ""
        return (f"clip youtube {clip[0]}{start} points at {row['audio_path']}, but line {seen[0]} gives it "
                f"{seen[1]}; one clip must have one audio file (give the other clip its own youtube_id/start_time)")


def _norm(path) -> str:
    return os.path.normpath(path) if isinstance(path, str) else str(path)


def _start(row: dict) -> float | None:
    start = row.get("start_time")
    return float(start) if _is_number(start) else None  # type: ignore[arg-type]  # _is_number: a real number
