"""Dataset audio path vs raw soundfile decode of the same files (clips/s, and their ratio).

Writes 10 s stereo FLAC clips at 48 kHz (the CLAP preset's rate), then times, in one process:
  raw:     soundfile.read of each whole file
  dataset: AudioCapsDataset(split="val") item access at 48 kHz/10 s (decode, downmix, crop/pad; no resample)
  dataset_16k: the same at 16 kHz (adds a soxr resample, as for Whisper or the tiny preset)
Target: dataset / raw >= 0.8 on one worker.

    python benchmarks/bench_audio_loading.py [--clips 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safe.data.datasets import AudioCapsDataset  # noqa: E402
from safe.data.manifest import write_jsonl  # noqa: E402


def make_clips(root: Path, clips: int, sample_rate: int = 48000, seconds: float = 10.0) -> list[Path]:
    rng = np.random.default_rng(0)
    paths, rows = [], []
    for i in range(clips):
        path = root / "audiocaps" / "audio" / f"clip{i:04d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        t = np.arange(int(sample_rate * seconds)) / sample_rate
        tone = 0.3 * np.sin(2 * np.pi * (200 + 20 * i) * t)
        noise = 0.05 * rng.standard_normal((t.size, 2))
        sf.write(str(path), (tone[:, None] + noise).astype(np.float32), sample_rate, subtype="PCM_16")
        paths.append(path)
        rows.append({"id": str(i), "audio_path": f"audio/{path.name}", "youtube_id": f"y{i}", "start_time": 0.0,
                     "captions": ["a tone"] * 5})
    write_jsonl(root / "audiocaps" / "audiocaps_val.jsonl", rows)
    return paths


def best_rate(fn, count: int, repeats: int) -> float:
    """Clips per second of the fastest of `repeats` passes (least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audio_loading.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_clips(root, args.clips)
        ds48 = AudioCapsDataset(root, "val", sample_rate=48000, clip_seconds=10.0)
        ds16 = AudioCapsDataset(root, "val", sample_rate=16000, clip_seconds=10.0)
        raw = best_rate(lambda: [sf.read(str(p), dtype="float32") for p in paths], len(paths), args.repeats)
        dataset = best_rate(lambda: [ds48[i] for i in range(len(ds48))], len(paths), args.repeats)
        dataset16 = best_rate(lambda: [ds16[i] for i in range(len(ds16))], len(paths), args.repeats)

    result = {
        "benchmark": "audio_loading",
        "machine": f"{platform.machine()} {platform.processor() or ''} {__import__('os').cpu_count()} cores".strip(),
        "clips": args.clips,
        "format": "FLAC 48 kHz stereo 10 s",
        "raw_decode_clips_per_s": round(raw, 2),
        "dataset_48k_clips_per_s": round(dataset, 2),
        "dataset_16k_clips_per_s": round(dataset16, 2),
        "ratio_dataset_48k_vs_raw": round(dataset / raw, 3),
        "ratio_dataset_16k_vs_raw": round(dataset16 / raw, 3),
        "target_ratio": 0.8,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
