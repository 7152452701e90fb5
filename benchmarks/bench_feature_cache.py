"""Feature cache: its size per clip for the real encoders, and the time of each epoch of the training audio stream with
the cache on (cold, then warm) and off.

Sizes: the encoders' output shapes come from their configs (CLAP = laion/clap-htsat-unfused, Whisper-small at 10 s,
Whisper-large-v3 at 30 s windows), run on the meta device (no weights, no download), in bf16 as a GPU run stores them.
Before (v1): one safetensors file per window holding the unpooled sequence (4 KiB file-system blocks). After (v2): the
projector's 32-step pre-pool grid, in 64 MiB shards with an index (measured: the exact bytes of one entry).

Epochs:
One epoch = every batch of the training audio stream (AudioCapsDataset(train) with seeded random windows ->
collate_samples -> batch_features, i.e. decode + resample + frozen encoder, or a cache read) on the small toy
world with the tiny preset's encoder (TinyConvEncoder, 16 kHz, 4 s clips). Training crops come from a fixed
set of windows per clip (safe.data.audio.window_starts), so a clip longer than the crop may draw a window in
epoch 2 that epoch 1 did not encode: epoch 3 shows the fully warm state.
Reported: epoch-2 / epoch-1 (and epoch-3 / epoch-1) with the cache on, and the same ratios with it off.

With --window-seconds 6 every toy clip (2.5-6 s) is one window, the shape of AudioCaps under the real presets
(clips of at most 10 s, 10 s windows): epoch 2 is then all cache hits.

    python benchmarks/bench_feature_cache.py [--epochs 3] [--repeats 3] [--world small|medium] [--threads 1]
                                             [--window-seconds S]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import torch
from _common import median, write_result


class EncoderOnly:
    """What batch_features needs of a SAFEModel: the frozen encoder and a device."""

    def __init__(self, encoder):
        self.audio_encoder, self.device = encoder, torch.device("cpu")

    def audio_features(self, waveforms):
        return self.audio_encoder(waveforms)


def epoch_times(world: Path, cache_dir: Path | None, epochs: int, batch_size: int,
                window_seconds: float | None = None) -> list[dict]:
    from safe.data.datasets import AudioCapsDataset
    from safe.data.feature_cache import FeatureCache
    from safe.models.audio_encoders import TinyConvEncoder
    from safe.training.data import BatchStream
    from safe.training.features import batch_features

    encoder = TinyConvEncoder(seed=0, clip_seconds=window_seconds or 4.0)
    seconds = encoder.clip_seconds
    dataset = AudioCapsDataset(world, "train", sample_rate=encoder.sample_rate, clip_seconds=seconds, training=True,
                               seed=0)
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, encoder.encoder_id, encoder.sample_rate, seconds)
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
            assert features.shape[0] == collated.size
            hits += len(collated.feature_index)
            items += collated.size
        rows.append({"epoch": epoch + 1, "seconds": round(time.perf_counter() - start, 4), "items": items,
                     "cache_hits": hits})
    return rows


SHARD_BYTES = 64 << 20
AUDIOCAPS_TRAIN_CLIPS, WAVCAPS_CLIPS, WAVCAPS_WINDOWS_V1 = 49_838, 403_050, 1_900_000


def encoder_shapes() -> dict:
    """{name: (steps, width, clip seconds)} of each real encoder's features, from its config on the meta device."""
    from transformers import ClapAudioConfig, ClapAudioModel, WhisperConfig, WhisperModel

    shapes = {}
    with torch.device("meta"):
        clap = ClapAudioModel(ClapAudioConfig())  # laion/clap-htsat-unfused's audio tower
        out = clap(input_features=torch.zeros(1, 1, 1001, 64), is_longer=torch.zeros(1, 1, dtype=torch.bool))
        shapes["clap-htsat-unfused (10 s)"] = (out.last_hidden_state.flatten(2).shape[-1], clap.config.hidden_size, 10)
        for name, seconds, config in (
                ("whisper-small (10 s)", 10, WhisperConfig(d_model=768, encoder_layers=12, encoder_attention_heads=12,
                                                           encoder_ffn_dim=3072, decoder_layers=1, num_mel_bins=80)),
                ("whisper-large-v3 (30 s)", 30, WhisperConfig(d_model=1280, encoder_layers=32,
                                                              encoder_attention_heads=20, decoder_attention_heads=20,
                                                              encoder_ffn_dim=5120, decoder_layers=1,
                                                              num_mel_bins=128))):
            hidden = WhisperModel(config).get_encoder()(torch.zeros(1, config.num_mel_bins, 3000)).last_hidden_state
            # safe.models.audio_encoders.WhisperEncoderWrapper keeps the clip's own frames (50 a second).
            shapes[name] = (min(hidden.shape[1], int(seconds * hidden.shape[1] / 30)), config.d_model, seconds)
    return shapes


def cache_sizes() -> dict:
    from safetensors.torch import save

    from safe.core.diskspace import on_disk
    from safe.data.feature_cache import FORMAT
    from safe.models.projector import pre_pool_grid

    grid = pre_pool_grid(16, 32)  # the real presets: k = 16 tokens, 32-step pre-pool grid
    out = {}
    for name, (steps, width, seconds) in encoder_shapes().items():
        before = on_disk(steps * width * 2 + 1024)  # v1's own estimate: values + a header holding the key
        after = len(save({"features": torch.zeros(min(steps, grid), width, dtype=torch.bfloat16)},
                         metadata={"format": FORMAT}))
        per_shard = SHARD_BYTES // after
        out[name] = {
            "encoder_steps": steps, "width": width, "window_seconds": seconds, "grid": min(steps, grid),
            "bytes_per_window_before": before, "bytes_per_window_after": after,
            "ratio_after_over_before": round(after / before, 4),
            "files_per_10k_clips_before": 10_000, "files_per_10k_clips_after": 2 * -(-10_000 // per_shard),
            "audiocaps_train_gib_before": round(AUDIOCAPS_TRAIN_CLIPS * before / 2**30, 2),
            "audiocaps_train_gib_after": round(AUDIOCAPS_TRAIN_CLIPS * after / 2**30, 2),
            "wavcaps_gib_after_first_windows": round(WAVCAPS_CLIPS * after / 2**30, 1)}
        if seconds == 10:  # WavCaps' window count is for 10 s windows
            out[name]["wavcaps_gib_before_all_windows"] = round(WAVCAPS_WINDOWS_V1 * before / 2**30, 1)
            out[name]["wavcaps_gib_after_all_windows"] = round(WAVCAPS_WINDOWS_V1 * after / 2**30, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (cache off, then on, each)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--world", choices=("small", "medium"), default="small")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--window-seconds", type=float, default=None,
                        help="training window (default: the tiny encoder's 4 s, so clips over 4 s have 2 windows; 6 "
                        "fits every toy clip in one window, as 10 s windows fit AudioCaps' 10 s clips)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        from safe.toy.world import synthesize_toy_world

        world = Path(tmp) / "world"
        synthesize_toy_world(world, seed=0, size=args.world)
        # Untimed: imports, page cache, allocator warm-up.
        epoch_times(world, None, 1, args.batch_size, args.window_seconds)
        for repeat in range(args.repeats):
            off = epoch_times(world, None, args.epochs, args.batch_size, args.window_seconds)
            on = epoch_times(world, Path(tmp) / f"features{repeat}", args.epochs, args.batch_size,  # cold each time
                             args.window_seconds)
            runs.append({"off": off, "on": on})

    def ratio(rows, epoch):
        return rows[epoch - 1]["seconds"] / rows[0]["seconds"]

    def spread(values):
        return {"median": round(median(values), 3), "range": [round(min(values), 3), round(max(values), 3)]}

    sizes = cache_sizes()
    for name, figures in sizes.items():
        print(f"{name}: {figures['bytes_per_window_before']} -> {figures['bytes_per_window_after']} bytes a window, "
              f"{figures['files_per_10k_clips_before']} -> {figures['files_per_10k_clips_after']} files per 10k clips")
    write_result("feature_cache", {
        "sizes": sizes, "sizes_note": "bf16 entries (a GPU run); AudioCaps clips are one 10 s window; WavCaps "
        f"{WAVCAPS_CLIPS} clips, {WAVCAPS_WINDOWS_V1} windows when every window is cached (v1 did; v2 caches the first "
        "by default and the rest as training draws them)",
        "world": args.world, "encoder": "tiny (TinyConvEncoder, 16 kHz, 4 s)", "threads": args.threads,
        "window_seconds": args.window_seconds or 4.0,
        "repeats": args.repeats,
        "ratio_epoch2_over_epoch1_cache_on": spread([ratio(r["on"], 2) for r in runs]),
        "ratio_epoch3_over_epoch1_cache_on": spread([ratio(r["on"], 3) for r in runs]),
        "ratio_epoch2_over_epoch1_cache_off": spread([ratio(r["off"], 2) for r in runs]),
        "cold_cache_overhead": spread([r["on"][0]["seconds"] / r["off"][0]["seconds"] for r in runs]),
        "runs": runs,
    }, args.out)


if __name__ == "__main__":
    main()
