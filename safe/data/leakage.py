"""Which WavCaps clips are AudioCaps evaluation clips: the matching rules shared by `safe data validate` (which
reports them) and the training data loader (which drops them, so a run never trains on what it evaluates).

WavCaps names its AudioSet clips by YouTube id in several forms ('Y<yid>.wav', '<yid>_30000', ...); WavCaps ships
blacklists of such ids (JSON objects of lists) for AudioCaps and Clotho evaluation clips.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safe.core.errors import SafeError

_AUDIO_SUFFIX = re.compile(r"\.(wav|flac|mp3|ogg|m4a|webm|opus)$", flags=re.IGNORECASE)


def id_keys(text) -> set[str]:
    """Forms an id can take in file names: 'Y<yid>', '<yid>_30000', 'Y<yid>_30.000_40.000.wav' -> '<yid>' etc."""
    stem = _AUDIO_SUFFIX.sub("", Path(str(text)).name)
    keys = set()
    for form in {stem, stem[1:] if stem.startswith("Y") else stem}:
        if form:
            keys.add(form)
            keys.update(form[: m.start()] for m in re.finditer("_", form) if m.start() > 0)
    return keys


def plain_keys(text) -> set[str]:
    """A listed id in its plain forms only (no prefix expansion, so two ids sharing a prefix never collide)."""
    stem = _AUDIO_SUFFIX.sub("", Path(str(text)).name)
    return {form for form in (stem, stem[1:] if stem.startswith("Y") else "") if form}


def read_blacklist(path: Path) -> set[str]:
    """Ids from a text file (one per line, '#' comments, first CSV field), a JSON list, or a JSON object of lists
    (the shape of WavCaps' own blacklist files)."""
    path = Path(path)
    if not path.is_file():
        raise SafeError(f"Blacklist {path} does not exist; check --blacklist / --wavcaps-blacklist.")
    text = path.read_text(encoding="utf-8")
    ids: set[str] = set()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for values in data.values():
            if isinstance(values, list):
                ids.update(str(v) for v in values)
    elif isinstance(data, list):
        ids.update(str(v) for v in data)
    else:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                ids.add(line.split(",")[0].strip())
    ids.discard("")
    if not ids:
        raise SafeError(f"Blacklist {path} holds no ids; one id per line, a JSON list, or a JSON object of lists.")
    return ids


def banned_keys(heldout_youtube_ids, blacklist: set[str] | None = None) -> set[str]:
    """The id forms a WavCaps row must not match: AudioCaps val/test YouTube ids and every blacklisted id."""
    banned = {str(y) for y in heldout_youtube_ids if y}
    for item in blacklist or ():
        banned |= plain_keys(item)
    return banned


def wavcaps_row_is_banned(row: dict, banned: set[str]) -> bool:
    return bool((id_keys(row.get("id", "")) | id_keys(row.get("audio_path", ""))) & banned)
