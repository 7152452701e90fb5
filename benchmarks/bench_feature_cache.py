"""Feature cache: time of each epoch of the training audio stream, cache on (cold, then warm) and off.

One epoch = every batch of the training audio stream (AudioCapsDataset(train) with seeded random windows ->
collate_samples -> batch_features, i.e. decode + resample + frozen encoder, or a cache read) on the small toy
world with the tiny preset's encoder (TinyConvEncoder, 16 kHz, 4 s clips). Training crops come from a fixed
set of windows per clip (safe.data.audio.window_starts), so a clip longer than the crop may draw a window in
epoch 2 that epoch 1 did not encode: epoch 3 shows the fully warm state.
Reported: epoch-2 / epoch-1 (and epoch-3 / epoch-1) with the cache on, and the same ratios with it off.

    python benchmarks/bench_feature_cache.py [--epochs 3] [--world small|medium] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import write_result

import torch


class EncoderOnly:
    """What batch_features needs of a SAFEModel: the frozen encoder and a device."""

    def __init__(self, encoder):
        self.audio_encoder, self.device = encoder, torch.device("cpu")

    def audio_features(self, waveforms):
        return self.audio_encoder(waveforms)


def epoch_times(world: Path, cache_dir: Path | None, epochs: int, batch_size: int) -> list[dict]:
    from safe.data.datasets import AudioCapsDataset
    from safe.data.feature_cache import FeatureCache
    from safe.models.audio_encoders import TinyConvEncoder
    from safe.training.data import BatchStream
    from safe.training.features import batch_features

    encoder = TinyConvEncoder(seed=0)
    dataset = AudioCapsDataset(world, "train", sample_rate=encoder.sample_rate, clip_seconds=encoder.clip_seconds,
                               training=True, seed=0)
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, encoder.encoder_id, encoder.sample_rate, encoder.clip_seconds)
        dataset.feature_cache = cache
    model = EncoderOnly(encoder)
    stream = BatchStream(dataset, batch_size, seed=0, stream=0, num_workers=0)
    rows = []
    for epoch in range(epochs):
        hits = items = 0
        start = time.perf_counter()
        for _ in range(stream.batches_per_epoch):
            collated = stream.next()
            features = batch_features(collated, model, cache)
            assert features.shape[0] == collated["size"]
            hits += len(collated["feature_index"])
            items += collated["size"]
        rows.append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - start, 4), "items": items,
                     "cache_hits": hits})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--world", choices=("small", "medium"), default="small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        from safe.data.synth import synthesize_toy_world

        world = Path(tmp) / "world"
        synthesize_toy_world(world, seed=0, size=args.world)
        epoch_times(world, None, 1, args.batch_size)  # untimed: imports, page cache, allocator warm-up
        off = epoch_times(world, None, args.epochs, args.batch_size)
        on = epoch_times(world, Path(tmp) / "features", args.epochs, args.batch_size)

    def ratios(rows):
        return {f"epoch{r['epoch']}_over_epoch1": round(r["seconds"] / rows[0]["seconds"], 3) for r in rows[1:]}

    write_result("feature_cache", {
        "world": args.world, "encoder": "tiny (TinyConvEncoder, 16 kHz, 4 s)", "threads": args.threads,
        "ratio_epoch2_over_epoch1_cache_on": round(on[1]["seconds"] / on[0]["seconds"], 3),
        "ratio_epoch2_over_epoch1_cache_off": round(off[1]["seconds"] / off[0]["seconds"], 3),
        "cache_on": {"epochs": on, **ratios(on)}, "cache_off": {"epochs": off, **ratios(off)},
        "cold_cache_overhead": round(on[0]["seconds"] / off[0]["seconds"], 3),
    }, args.out)


if __name__ == "__main__":
    main()
