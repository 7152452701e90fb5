"""Deterministic toy world (docs/design.md, "The toy world"): synthetic sounds with templated captions, and
coloured-shape VQA.

`safe data synth --out DIR [--seed S] [--size small|medium]` writes the README's data layout:

    <out>/audiocaps/audiocaps_{train,val,test}.jsonl + audio/{train,val,test}/ac_*.{wav,flac,ogg}
    <out>/wavcaps/wavcaps_train.jsonl + audio/<Subset>/<nested>/*.{wav,flac}
    <out>/clotho/clotho_captions_{development,validation,evaluation}.csv + {development,validation,evaluation}/*.wav
        (the official Clotho layout, 44.1 kHz clips longer than the tiny encoder's window, names with spaces and
        commas) and clotho_{train,val,test}.jsonl, converted from them as `safe data prepare clotho` does
    <out>/vqa/vqa_{train,val}.jsonl + images/{train2014,val2014}/COCO_*.png
    <out>/toy_labels.json   ground-truth attributes per clip and objects per image (for tests, pretraining)
    <out>/toy_world.json    seed, size, version, counts, every caption text the generator can say, vocabulary

Same seed + size -> byte-identical files (every clip and image draws from its own PCG64 stream keyed by
(seed, split, index), so nothing depends on generation order). Sounds are built from a few attributes
(kind, pitch, count, speed, background) so a small frozen encoder can tell them apart, and the attribute
combinations are balanced: since every clip gets the same prompt, the caption can only come from the audio.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw

from safe.core.diskspace import check_free_space, disk_full_error, free_bytes, is_disk_full
from safe.core.errors import SafeError
from safe.core.files import atomic_write_text
from safe.data.manifest import write_jsonl

VERSION = "toy-world-2"  # 2: the Clotho-shaped folder

# Counts per size. "small" is for tests (< 5 s to generate); "medium" is the demo world.
SIZES: dict[str, dict[str, int]] = {
    "small": {
        "audiocaps_train": 48, "audiocaps_val": 16, "audiocaps_test": 8, "wavcaps": 24,
        "vqa_train": 60, "vqa_val": 30, "clotho_development": 9, "clotho_validation": 3, "clotho_evaluation": 6,
    },
    "medium": {
        "audiocaps_train": 600, "audiocaps_val": 100, "audiocaps_test": 50, "wavcaps": 200,
        "vqa_train": 2000, "vqa_val": 300, "clotho_development": 90, "clotho_validation": 30,
        "clotho_evaluation": 50,
    },
}
# Disk space each world takes (measured for seed 0, plus 2 % for other seeds), checked before writing.
WORLD_BYTES = {"small": 27_700_000, "medium": 265_000_000}  # with the Clotho folder (official layout)
SAMPLE_RATES = (16000, 22050, 44100)
N_REFERENCES = 5  # val/test references per clip
TRAIN_CAPTIONS = (2, 3)  # captions per train clip (inclusive range)
QUESTIONS_PER_IMAGE = 3
IMAGE_SIZE = 48
GRID = 3  # 3x3 cells of 16 px: one object per cell, aligned with the tiny ViT's 16 px patches
OGG_EVERY = 24  # audiocaps train clips i % OGG_EVERY == 5 are Ogg Vorbis (>= 2 in the small world)
STREAMS = {"audiocaps_train": 1, "audiocaps_val": 2, "audiocaps_test": 3, "wavcaps": 4, "vqa_train": 5, "vqa_val": 6,
           "clotho_development": 7, "clotho_validation": 8, "clotho_evaluation": 9}
CLOTHO_RATE = 44100  # Clotho ships 44.1 kHz mono WAV
CLOTHO_SECONDS = (6.0, 10.0)  # longer than the tiny encoder's 4 s window, as real 15-30 s clips exceed CLAP's 10 s

# ----------------------------------------------------------------------------------------------- sounds

PITCHES = ("low", "high")
COUNTS = (1, 2, 3)
SPEEDS = ("slow", "fast")
# Which attribute axes each kind of sound varies along. Kinds with a count are short events (the whole
# clip fits a 4 s window); the others are stationary, so any crop shows them.
KIND_AXES: dict[str, tuple[str, ...]] = {
    "tone": ("pitch",),
    "beep": ("pitch", "count"),
    "chirp_up": ("speed",),
    "chirp_down": ("speed",),
    "noise": ("count",),
    "click": ("speed",),
    "hum": ("speed",),
    "siren": ("pitch",),
    "knock": ("count",),
}
KINDS = tuple(KIND_AXES)
AXIS_VALUES = {"pitch": PITCHES, "count": COUNTS, "speed": SPEEDS}

# Paraphrase templates per kind. Slots: {p} high/low, {adv} once/twice/three times, {num} one/two/three,
# {s} plural suffix, {sadv} slowly/quickly, {sadj} slow/fast, {radj} slow/rapid.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "tone": (
        "a steady {p} pitched tone",
        "a constant {p} tone plays",
        "a {p} tone sounds on and on",
        "a device plays a steady {p} tone",
        "a {p} pitched tone is held",
        "a {p} note is held",
    ),
    "beep": (
        "a {p} pitched tone beeps {adv}",
        "{num} short {p} beep{s}",
        "a {p} beep sounds {adv}",
        "a device beeps {adv} at a {p} pitch",
        "a device makes {num} {p} pitched beep{s}",
        "a machine makes {num} short {p} beep{s}",
    ),
    "chirp_up": (
        "a tone rises {sadv} again and again",
        "{radj} rising chirps repeat",
        "a pitch sweeps upward {sadv} over and over",
        "{sadj} upward sweeps repeat",
        "a chirp rises in pitch {sadv} and repeats",
        "a sound sweeps up {sadv} many times",
    ),
    "chirp_down": (
        "a tone falls {sadv} again and again",
        "{radj} falling chirps repeat",
        "a pitch sweeps downward {sadv} over and over",
        "{sadj} downward sweeps repeat",
        "a chirp falls in pitch {sadv} and repeats",
        "a sound sweeps down {sadv} many times",
    ),
    "noise": (
        "a burst of static noise plays {adv}",
        "{num} short burst{s} of static",
        "static noise bursts {adv}",
        "a loud hiss of static is heard {adv}",
        "{num} burst{s} of loud noise",
        "a machine makes {num} loud burst{s} of static",
    ),
    "click": (
        "{radj} clicking",
        "something ticks {sadv}",
        "many {radj} clicks",
        "clicks repeat {sadv}",
        "a clicking sound at a {sadj} pace",
        "a clock ticks {sadv}",
    ),
    "hum": (
        "a low hum wobbles {sadv}",
        "a low electric hum with a {sadj} wobble",
        "a low humming sound pulses {sadv}",
        "a machine hums low and wobbles {sadv}",
        "a {sadj} pulsing low hum",
        "a low hum pulses {sadv} again and again",
    ),
    "siren": (
        "a {p} pitched siren wails",
        "a siren warbles at a {p} pitch",
        "a {p} warbling alarm",
        "a {p} siren sweeps up and down",
        "a siren with a {p} warble",
        "a {p} pitched alarm wails",
    ),
    "knock": (
        "someone knocks {adv}",
        "{num} knock{s} on a door",
        "a door is knocked on {adv}",
        "knocking on wood {adv}",
        "someone knocks on a door {adv}",
        "{num} loud knock{s}",
    ),
}
# Clips with background noise always say so (the caption has to follow the audio).
BACKGROUND_SUFFIXES = (
    " with quiet background noise",
    " over a faint hiss",
    " with a quiet hiss in the background",
    " with faint noise in the background",
)
_ADV = {1: "once", 2: "twice", 3: "three times"}
_NUM = {1: "one", 2: "two", 3: "three"}
_SADV = {"slow": "slowly", "fast": "quickly"}
_RADJ = {"slow": "slow", "fast": "rapid"}


@dataclass(frozen=True)
class SoundSpec:
    """The attributes a clip is built from (and its captions describe)."""

    kind: str
    pitch: str | None = None
    count: int | None = None
    speed: str | None = None
    background: bool = False

    def as_dict(self) -> dict:
        return {"kind": self.kind, "pitch": self.pitch, "count": self.count, "speed": self.speed,
                "background": self.background}

    def combo(self) -> str:
        """A short key for the attribute combination (used to check caption balance)."""
        parts = [self.kind] + [str(getattr(self, axis)) for axis in KIND_AXES[self.kind]]
        return "/".join(parts + (["bg"] if self.background else []))


def caption_text(spec: SoundSpec, template: int, suffix: int = 0) -> str:
    """Fill one paraphrase template for `spec`; `suffix` picks the background phrase (ignored without one)."""
    count = spec.count or 1
    text = TEMPLATES[spec.kind][template].format(
        p=spec.pitch or "", adv=_ADV[count], num=_NUM[count], s="" if count == 1 else "s",
        sadv=_SADV.get(spec.speed or "", ""), sadj=spec.speed or "", radj=_RADJ.get(spec.speed or "", ""),
    )
    if spec.background:
        text += BACKGROUND_SUFFIXES[suffix]
    return text


def all_specs() -> list[SoundSpec]:
    """Every attribute combination the world can contain, in a fixed order."""
    specs = []
    for kind, axes in KIND_AXES.items():
        grids: list[list[tuple[str, Any]]] = [[]]
        for axis in axes:
            grids = [g + [(axis, v)] for g in grids for v in AXIS_VALUES[axis]]
        for grid in grids:
            for background in (False, True):
                specs.append(SoundSpec(kind=kind, background=background, **dict(grid)))
    return specs


def all_caption_texts() -> list[str]:
    texts = set()
    for spec in all_specs():
        for t in range(len(TEMPLATES[spec.kind])):
            for s in range(len(BACKGROUND_SUFFIXES) if spec.background else 1):
                texts.add(caption_text(spec, t, s))
    return sorted(texts)


def balanced_specs(n: int, rng: np.random.Generator) -> list[SoundSpec]:
    """n specs with kinds as even as possible, and each kind cycling through all its combinations.

    Kinds come in shuffled blocks of len(KINDS); within a kind, its (attributes x background) combinations
    are shuffled once and cycled, so no combination can dominate a split.
    """
    by_kind: dict[str, list[SoundSpec]] = {k: [] for k in KINDS}
    for spec in all_specs():
        by_kind[spec.kind].append(spec)
    for kind in KINDS:
        order = rng.permutation(len(by_kind[kind]))
        by_kind[kind] = [by_kind[kind][i] for i in order]
    used: Counter[str] = Counter()
    out: list[SoundSpec] = []
    while len(out) < n:
        for i in rng.permutation(len(KINDS)):
            kind = KINDS[i]
            out.append(by_kind[kind][used[kind] % len(by_kind[kind])])
            used[kind] += 1
    return out[:n]


def _ramp(n: int, sr: int, seconds: float = 0.01) -> np.ndarray:
    """Trapezoid envelope of n samples (short fades avoid clicks at the edges)."""
    r = max(1, min(n // 2, int(sr * seconds)))
    env = np.ones(n)
    env[:r] = np.linspace(0.0, 1.0, r, endpoint=False)
    env[n - r:] = np.linspace(1.0, 0.0, r)
    return env


def _place(out: np.ndarray, event: np.ndarray, start: int) -> None:
    end = min(out.shape[0], start + event.shape[0])
    if end > start:
        out[start:end] += event[: end - start]


def render_sound(spec: SoundSpec, sr: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Synthesise n samples at rate sr for `spec` (float64, peak about 0.35-0.7)."""
    t = np.arange(n) / sr
    x = np.zeros(n)
    kind = spec.kind
    if kind == "tone":
        f = rng.uniform(220, 330) if spec.pitch == "low" else rng.uniform(1300, 1900)
        x = np.sin(2 * np.pi * f * t) + 0.25 * np.sin(4 * np.pi * f * t)
        x *= _ramp(n, sr, 0.05)
    elif kind == "beep":
        f = rng.uniform(300, 420) if spec.pitch == "low" else rng.uniform(1500, 2100)
        length, gap = rng.uniform(0.18, 0.26), rng.uniform(0.32, 0.42)
        m = int(length * sr)
        tt = np.arange(m) / sr
        beep = (np.sin(2 * np.pi * f * tt) + 0.3 * np.sin(6 * np.pi * f * tt)) * _ramp(m, sr, 0.008)
        start = rng.uniform(0.1, 0.4)
        for k in range(cast(int, spec.count)):  # these kinds always have a count
            _place(x, beep, int((start + k * (length + gap)) * sr))
    elif kind in ("chirp_up", "chirp_down"):
        period = rng.uniform(0.9, 1.1) if spec.speed == "slow" else rng.uniform(0.28, 0.34)
        sweep = period * 0.8
        f0, f1 = rng.uniform(350, 450), rng.uniform(2600, 3200)
        if kind == "chirp_down":
            f0, f1 = f1, f0
        pos = (t + rng.uniform(0, period)) % period
        active = pos < sweep
        freq = f0 * (f1 / f0) ** np.clip(pos / sweep, 0, 1)
        phase = 2 * np.pi * np.cumsum(freq) / sr
        edge = np.minimum(1.0, np.minimum(pos, sweep - pos) / 0.01)
        x = np.sin(phase) * np.where(active, edge, 0.0)
    elif kind == "noise":
        length, gap = rng.uniform(0.3, 0.42), rng.uniform(0.35, 0.45)
        start = rng.uniform(0.1, 0.35)
        for k in range(cast(int, spec.count)):  # these kinds always have a count
            m = int(length * sr)
            _place(x, rng.standard_normal(m) * 0.35 * _ramp(m, sr, 0.01), int((start + k * (length + gap)) * sr))
    elif kind == "click":
        rate = rng.uniform(2.5, 3.5) if spec.speed == "slow" else rng.uniform(10, 13)
        m = int(0.006 * sr)
        tt = np.arange(m) / sr
        fc = rng.uniform(2500, 3500)
        click = np.exp(-tt / 0.0012) * np.sin(2 * np.pi * fc * tt)
        when = rng.uniform(0, 1 / rate)
        while when < n / sr:
            _place(x, click * rng.uniform(0.8, 1.0), int(when * sr))
            when += (1 / rate) * rng.uniform(0.95, 1.05)
    elif kind == "hum":
        f = rng.uniform(90, 130)
        rate = rng.uniform(1.5, 2.5) if spec.speed == "slow" else rng.uniform(7, 9)
        x = cast(np.ndarray, sum(np.sin(2 * np.pi * h * f * t) / h for h in range(1, 5)))
        x *= (1.0 + 0.85 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))) / 1.85
        x *= _ramp(n, sr, 0.05)
    elif kind == "siren":
        fc = rng.uniform(450, 600) if spec.pitch == "low" else rng.uniform(1400, 1800)
        rate = rng.uniform(1.2, 1.8)
        freq = fc * (1 + 0.25 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi)))
        x = np.sin(2 * np.pi * np.cumsum(freq) / sr) * _ramp(n, sr, 0.05)
    elif kind == "knock":
        gap = rng.uniform(0.28, 0.4)
        f = rng.uniform(160, 240)
        m = int(0.15 * sr)
        tt = np.arange(m) / sr
        start = rng.uniform(0.1, 0.4)
        for k in range(cast(int, spec.count)):  # these kinds always have a count
            knock = np.exp(-tt / 0.03) * np.sin(2 * np.pi * f * tt)
            knock[: int(0.004 * sr)] += rng.standard_normal(int(0.004 * sr)) * 0.6
            _place(x, knock, int((start + k * gap) * sr))
    else:  # pragma: no cover - KIND_AXES is closed
        raise ValueError(kind)
    peak = float(np.max(np.abs(x))) or 1.0
    x = x / peak * rng.uniform(0.35, 0.7)
    if spec.background:
        x = x + rng.standard_normal(n) * rng.uniform(0.012, 0.02)
    return np.clip(x, -0.99, 0.99)


def clip_duration(spec: SoundSpec, rng: np.random.Generator) -> float:
    # Counted events stay inside 4 s so a tiny-preset random crop never cuts one off.
    return float(rng.uniform(2.5, 4.0) if spec.count else rng.uniform(2.5, 6.0))


# ------------------------------------------------------------------------------------------ file output


def _stream(seed: int, split: str, index: int) -> np.random.Generator:
    """One independent generator per (seed, split, item), so output never depends on generation order."""
    return np.random.Generator(np.random.PCG64([seed, STREAMS[split], index]))


def _ogg_crc(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = (crc << 8) ^ _OGG_TABLE[((crc >> 24) & 0xFF) ^ byte]
        crc &= 0xFFFFFFFF
    return crc


def _make_ogg_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_TABLE = _make_ogg_table()


def _fix_ogg_serial(data: bytes, serial: int) -> bytes:
    """libsndfile picks a random Ogg stream serial; pin it (and redo each page CRC) for byte-identical files."""
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos:pos + 4] != b"OggS":
            raise RuntimeError("unexpected Ogg page layout")
        nseg = out[pos + 26]
        size = 27 + nseg + sum(out[pos + 27:pos + 27 + nseg])
        out[pos + 14:pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22:pos + 26] = b"\0\0\0\0"
        out[pos + 22:pos + 26] = _ogg_crc(bytes(out[pos:pos + size])).to_bytes(4, "little")
        pos += size
    return bytes(out)


def write_audio(path: Path, samples: np.ndarray, sr: int, serial: int = 0) -> None:
    """Write mono audio by extension: PCM_16 WAV/FLAC (deterministic) or Ogg Vorbis with a pinned serial."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = samples.astype(np.float32)
    ext = path.suffix.lower()
    if ext == ".ogg":
        buf = io.BytesIO()
        sf.write(buf, data, sr, format="OGG", subtype="VORBIS")
        path.write_bytes(_fix_ogg_serial(buf.getvalue(), serial))
    else:
        sf.write(str(path), data, sr, format=ext[1:].upper(), subtype="PCM_16")


@dataclass
class Clip:
    rel_path: str  # relative to the dataset folder
    spec: SoundSpec
    sample_rate: int
    frames: int
    rng: np.random.Generator  # continues after synthesis: captions draw from the same stream

    @property
    def duration(self) -> float:
        return round(self.frames / self.sample_rate, 3)


def _make_clip(folder: Path, rel_path: str, spec: SoundSpec, split: str, index: int, seed: int) -> Clip:
    rng = _stream(seed, split, index)
    sr = SAMPLE_RATES[int(rng.integers(len(SAMPLE_RATES)))]
    frames = int(round(clip_duration(spec, rng) * sr))
    samples = render_sound(spec, sr, frames, rng)
    write_audio(folder / rel_path, samples, sr, serial=(seed * 1000003 + index) & 0x7FFFFFFF)
    return Clip(rel_path, spec, sr, frames, rng)


def _captions(clip: Clip, k: int) -> list[str]:
    """k distinct paraphrases of the clip's spec."""
    templates = clip.rng.choice(len(TEMPLATES[clip.spec.kind]), size=k, replace=False)
    return [caption_text(clip.spec, int(t), int(clip.rng.integers(len(BACKGROUND_SUFFIXES)))) for t in templates]


def _youtube_id(rng: np.random.Generator, taken: set[str]) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    while True:
        yid = "".join(alphabet[i] for i in rng.integers(len(alphabet), size=11))
        if yid not in taken:
            taken.add(yid)
            return yid


def _write_audiocaps(root: Path, seed: int, counts: dict, labels: dict) -> dict[str, int]:
    folder = root / "audiocaps"
    taken: set[str] = set()
    summary = {}
    next_id = 1
    for split in ("train", "val", "test"):
        key = f"audiocaps_{split}"
        specs = balanced_specs(counts[key], _stream(seed, key, 10**6))
        rows: list[dict] = []
        for i, spec in enumerate(specs):
            if split == "train" and i % OGG_EVERY == 5:
                ext = "ogg"
            else:
                ext = "wav" if i % 3 == 0 else "flac"
            clip_id = f"ac_{next_id:06d}"
            next_id += 1
            clip = _make_clip(folder, f"audio/{split}/{clip_id}.{ext}", spec, key, i, seed)
            labels[f"audiocaps/{clip.rel_path}"] = spec.as_dict()
            base = {"id": clip_id, "audio_path": clip.rel_path, "youtube_id": _youtube_id(clip.rng, taken),
                    "start_time": 0.0}
            if split == "train":
                k = int(clip.rng.integers(TRAIN_CAPTIONS[0], TRAIN_CAPTIONS[1] + 1))
                rows.extend({**base, "caption": c} for c in _captions(clip, k))
            else:
                rows.append({**base, "captions": _captions(clip, N_REFERENCES)})
        write_jsonl(folder / f"audiocaps_{split}.jsonl", rows)
        summary[f"audiocaps_{split}_clips"] = len(specs)
        summary[f"audiocaps_{split}_rows"] = len(rows)
    return summary


# WavCaps-style subsets: (subset, id prefix, folder layout, extensions cycled)
WAVCAPS_SUBSETS = (
    ("FreeSound", "fs", "letter", ("flac", "flac", "wav")),
    ("BBC_Sound_Effects", "bbc", "flat", ("wav",)),
    ("SoundBible", "sb", "two_levels", ("wav", "flac")),
    ("AudioSet_SL", "as", "flat", ("flac",)),
)


def _write_wavcaps(root: Path, seed: int, counts: dict, labels: dict) -> dict[str, int]:
    folder = root / "wavcaps"
    specs = balanced_specs(counts["wavcaps"], _stream(seed, "wavcaps", 10**6))
    rows = []
    for i, spec in enumerate(specs):
        subset, prefix, layout, exts = WAVCAPS_SUBSETS[i % len(WAVCAPS_SUBSETS)]
        number = i + 1
        ext = exts[(i // len(WAVCAPS_SUBSETS)) % len(exts)]
        name = f"{prefix}_{number:06d}.{ext}"
        if layout == "letter":
            sub = f"{'abcdefgh'[(i // len(WAVCAPS_SUBSETS)) % 8]}/"
        elif layout == "two_levels":
            sub = f"{'xyz'[number % 3]}/{'uvw'[(number // 3) % 3]}/"
        else:
            sub = ""
        clip = _make_clip(folder, f"audio/{subset}/{sub}{name}", spec, "wavcaps", i, seed)
        labels[f"wavcaps/{clip.rel_path}"] = spec.as_dict()
        rows.append({"id": f"{prefix}_{number:06d}", "audio_path": clip.rel_path, "caption": _captions(clip, 1)[0],
                     "subset": subset, "duration": clip.duration})
    write_jsonl(folder / "wavcaps_train.jsonl", rows)
    return {"wavcaps_clips": len(rows)}


def _write_clotho(root: Path, seed: int, counts: dict, labels: dict) -> dict[str, int]:
    """The official Clotho layout (captions CSVs + audio folders), then its manifests through the converter."""
    import csv

    from safe.staging import clotho

    folder = root / "clotho"
    summary = {}
    number = 0
    for official, split in clotho.SPLITS:
        key = f"clotho_{official}"
        specs = balanced_specs(counts[key], _stream(seed, key, 10**6))
        rows = []
        for i, spec in enumerate(specs):
            number += 1
            # Official names carry spaces and commas (e.g. "Water dripping, birds.wav"); so do these.
            name = f"{spec.kind.replace('_', ' ')} recording {number:03d}, take {i % 3 + 1}.wav"
            rng = _stream(seed, key, i)
            frames = int(round(rng.uniform(*CLOTHO_SECONDS) * CLOTHO_RATE))
            write_audio(folder / official / name, render_sound(spec, CLOTHO_RATE, frames, rng), CLOTHO_RATE)
            labels[f"clotho/{official}/{name}"] = spec.as_dict()
            rows.append([name, *_captions(Clip(f"{official}/{name}", spec, CLOTHO_RATE, frames, rng), N_REFERENCES)])
        with open(folder / clotho.csv_name(official), "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["file_name", *clotho.CAPTION_COLUMNS])
            writer.writerows(rows)
        summary[f"clotho_{split}_clips"] = len(rows)
    manifests, _ = clotho.convert(clotho.read_official(folder, folder), folder, "")
    clotho.write_manifests(folder, manifests)
    return summary


# ------------------------------------------------------------------------------------------------- VQA

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 20), "purple": (140, 50, 170), "orange": (245, 130, 20),
}
BACKGROUNDS = ((245, 245, 245), (240, 236, 226), (232, 240, 244), (250, 248, 235))
# Annotator noise: synonyms (what a person might type instead) and plausible mistakes.
SYNONYMS = {"purple": "violet", "circle": "round", "square": "box", "yes": "yeah",
            "1": "one", "2": "two", "3": "three"}
CONFUSABLE_COLORS = {"red": "orange", "orange": "red", "yellow": "orange", "purple": "blue", "blue": "purple",
                     "green": "blue"}
NOISE_RATE = 0.1
MAX_NOISY = 3  # keeps the true answer the clear majority (>= 7 of 10)


def _draw_image(path: Path, rng: np.random.Generator) -> list[dict]:
    """Draw 1-3 distinct (shape, colour) objects, one per 16 px cell; return their descriptions."""
    n = int(rng.integers(1, 4))
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    draw = ImageDraw.Draw(image)
    cell = IMAGE_SIZE // GRID
    objects = []
    for pair_index, cell_index in zip(chosen, cells):
        shape, color = pairs[int(pair_index)]
        row, col = divmod(int(cell_index), GRID)
        size = int(rng.integers(10, 15))
        x0 = col * cell + int(rng.integers(1, cell - size))
        y0 = row * cell + int(rng.integers(1, cell - size))
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x0 + (size - 1) / 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)],
                         fill=COLORS[color])
        objects.append({"shape": shape, "color": color, "cell": [row, col], "bbox": list(box)})
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=6)
    return objects


QUESTION_TYPES = ("color", "shape", "yesno", "count")


def ask_question(objects: list[dict], rng: np.random.Generator) -> tuple[str, str]:
    """A fresh (question, answer) about an image's ``objects``, the types drawn uniformly, by the world's own rules
    (the tiny base trains on such questions about its training images besides the world's fixed ones)."""
    while True:
        made = _question(QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))], objects, rng)
        if made is not None:
            return made[0], made[1]


def _question(qtype: str, objects: list[dict], rng: np.random.Generator) -> tuple[str, str, str, str] | None:
    """(question, answer, answer_type, question_type) of one type about `objects`, or None if it doesn't fit."""
    shapes = Counter(o["shape"] for o in objects)
    colors = Counter(o["color"] for o in objects)
    if qtype == "color":
        unique = [o for o in objects if shapes[o["shape"]] == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"what color is the {o['shape']}?", o["color"], "other", "what color is the"
    if qtype == "shape":
        if len(objects) == 1:
            return "what shape is shown?", objects[0]["shape"], "other", "what shape is"
        unique = [o for o in objects if colors[o["color"]] == 1]
        if not unique:
            return None
        o = unique[int(rng.integers(len(unique)))]
        return f"what shape is the {o['color']} object?", o["shape"], "other", "what shape is"
    if qtype == "yesno":
        present = {(o["shape"], o["color"]) for o in objects}
        if rng.random() < 0.5:
            shape, color = sorted(present)[int(rng.integers(len(present)))]
            answer = "yes"
        else:
            # Absent pairs that share a shape or colour with the image are the hard "no"s; prefer them.
            absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
            near = [p for p in absent if p[0] in shapes or p[1] in colors]
            pool = near if near and rng.random() < 0.7 else absent
            shape, color = pool[int(rng.integers(len(pool)))]
            answer = "no"
        article = "an" if color[0] in "aeiou" else "a"
        return f"is there {article} {color} {shape}?", answer, "yes/no", "is there a"
    if qtype == "count":
        return "how many shapes are there?", str(len(objects)), "number", "how many"
    raise ValueError(qtype)


def _wrong_answer(answer: str, answer_type: str, objects: list[dict], rng: np.random.Generator) -> str:
    if answer_type == "yes/no":
        return "no" if answer == "yes" else "yes"
    if answer_type == "number":
        return str(int(answer) + (1 if answer == "1" or (answer != "3" and rng.random() < 0.5) else -1))
    if answer in COLORS:
        others = [o["color"] for o in objects if o["color"] != answer]
        if others and rng.random() < 0.5:
            return others[int(rng.integers(len(others)))]
        return CONFUSABLE_COLORS[answer]
    return [s for s in SHAPES if s != answer][int(rng.integers(len(SHAPES) - 1))]


def _answers(answer: str, answer_type: str, objects: list[dict], rng: np.random.Generator) -> list[str]:
    """10 annotator answers: mostly the truth, ~10% a synonym or a plausible mistake."""
    noisy = np.flatnonzero(rng.random(10) < NOISE_RATE)[:MAX_NOISY]
    answers = [answer] * 10
    for i in noisy:
        if answer in SYNONYMS and rng.random() < 0.4:
            answers[i] = SYNONYMS[answer]
        else:
            answers[i] = _wrong_answer(answer, answer_type, objects, rng)
    return answers


def _write_vqa(root: Path, seed: int, counts: dict, labels: dict) -> dict[str, int]:
    folder = root / "vqa"
    summary = {}
    qtypes = QUESTION_TYPES
    for split, image_base in (("train", 1), ("val", 500001)):
        key = f"vqa_{split}"
        rows: list[dict] = []
        image_index = 0
        while len(rows) < counts[key]:
            rng = _stream(seed, key, image_index)
            image_id = image_base + image_index
            rel = f"images/{split}2014/COCO_{split}2014_{image_id:012d}.png"
            objects = _draw_image(folder / rel, rng)
            labels[f"vqa/{rel}"] = {"objects": objects}
            asked: set[str] = set()
            # Rotate the starting type per image so the four types stay balanced.
            order = [qtypes[(image_index + k) % len(qtypes)] for k in range(len(qtypes))]
            for qtype in order:
                if len(asked) == QUESTIONS_PER_IMAGE or len(rows) == counts[key]:
                    break
                made = _question(qtype, objects, rng)
                if made is None or made[0] in asked:
                    continue
                question, answer, answer_type, question_type = made
                asked.add(question)
                answers = _answers(answer, answer_type, objects, rng)
                rows.append({
                    "question_id": image_id * 10 + len(asked) - 1, "image_path": rel, "question": question,
                    "answers": answers, "multiple_choice_answer": Counter(answers).most_common(1)[0][0],
                    "answer_type": answer_type, "question_type": question_type,
                })
            image_index += 1
        write_jsonl(folder / f"vqa_{split}.jsonl", rows)
        summary[f"vqa_{split}_questions"] = len(rows)
        summary[f"vqa_{split}_images"] = image_index
    return summary


# ------------------------------------------------------------------------------------------- the world


def vocabulary() -> list[str]:
    """Every word the toy world's captions, questions and answers can use."""
    words = set()
    for text in all_caption_texts():
        words.update(text.split())
    for shape in SHAPES:
        words.update(f"what color is the {shape} what shape is shown the object is there a an how many shapes are "
                     "there".split())
    words.update(SHAPES)
    words.update(COLORS)
    words.update(SYNONYMS.values())
    words.update(["yes", "no", "1", "2", "3", "4"])
    return sorted(words)


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n", fsync=False)


def _prepare_out(out_dir: Path) -> None:
    """Refuse to write into a non-empty folder that isn't an earlier toy world; clear an earlier toy world."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SafeError(f"--out {out_dir} is a file; pass a folder for the toy world.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / "toy_world.json").is_file():
            raise SafeError(f"--out {out_dir} is not empty and holds no toy world; pass an empty or new folder.")
        for name in ("audiocaps", "wavcaps", "vqa", "clotho"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
        (out_dir / "toy_world.json").unlink()  # written last again, so it only exists for a complete world
    out_dir.mkdir(parents=True, exist_ok=True)


PARTS = ("audiocaps", "wavcaps", "vqa", "clotho")


def synthesize_toy_world(out_dir: Path, seed: int = 0, size: str = "small", parts: tuple[str, ...] = PARTS) -> dict:
    """Write the toy world into out_dir and return {"seed", "size", "version", "counts"}.

    ``parts`` writes only some datasets (each from its own random stream, so a part is the same whichever others
    are written): the tiny base's build needs only the VQA part and the caption texts."""
    if size not in SIZES:
        raise SafeError(f"Unknown toy world size {size!r}; use one of {', '.join(SIZES)}.")
    if not isinstance(seed, int) or seed < 0:
        raise SafeError(f"The toy world seed must be a non-negative integer, got {seed!r}.")
    out_dir = Path(out_dir)
    _prepare_out(out_dir)
    check_free_space(out_dir, WORLD_BYTES[size])
    counts = SIZES[size]
    labels: dict[str, dict] = {}
    summary: dict[str, int] = {}
    writers = {"audiocaps": _write_audiocaps, "wavcaps": _write_wavcaps, "vqa": _write_vqa, "clotho": _write_clotho}
    unknown = set(parts) - set(writers)
    if unknown:
        raise SafeError(f"Unknown toy world part(s) {sorted(unknown)}; use {', '.join(PARTS)}.")
    try:
        for part in PARTS:
            if part in parts:
                summary.update(writers[part](out_dir, seed, counts, labels))
        _write_json_atomic(out_dir / "toy_labels.json", labels)
        meta = {"seed": seed, "size": size, "version": VERSION, "counts": summary,
                "caption_texts": all_caption_texts(), "vocabulary": vocabulary()}
        _write_json_atomic(out_dir / "toy_world.json", meta)
    except Exception as exc:
        # libsndfile reports a full disk as a bare error code, so a failed audio write on a full disk counts too.
        full = is_disk_full(exc) or (isinstance(exc, sf.SoundFileError) and (free_bytes(out_dir) or 0) < 1 << 20)
        if not full:
            raise
        _remove_partial_world(out_dir)  # frees the space, and lets the same command run again
        raise disk_full_error(out_dir, WORLD_BYTES[size], "the partial world was removed") from None
    return {"seed": seed, "size": size, "version": VERSION, "counts": summary}


def _remove_partial_world(out_dir: Path) -> None:
    for name in PARTS:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("toy_labels.json", "toy_world.json"):
        (out_dir / name).unlink(missing_ok=True)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the toy world (new, empty or an earlier toy world)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=tuple(SIZES), default="small")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    summary = synthesize_toy_world(args.out, seed=args.seed, size=args.size)
    counts = ", ".join(f"{k}={v}" for k, v in summary["counts"].items())
    print(f"toy world ({args.size}, seed {args.seed}) written to {args.out} in "
          f"{time.perf_counter() - started:.1f} s: {counts}")
    return 0


def main(argv: list[str] | None = None, prog: str = "safe data synth") -> int:
    from safe.core.commands import standalone

    return standalone(__name__, argv, prog, "Write the deterministic toy world.")


if __name__ == "__main__":
    raise SystemExit(main())
