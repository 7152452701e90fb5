"""`safe cache-features`: fill the frozen audio-feature cache before training (DESIGN §10).

Every training window of every training clip (AudioCaps train, plus WavCaps with --use-wavcaps) and the first
window of each evaluation clip is encoded by the run's frozen encoder (loaded exactly as `safe train` loads it) and
written to the same cache `safe train` reads, so the first epoch already skips the encoder. Entries already in the
cache are skipped, so an interrupted run resumes where it stopped. Clips are decoded by DataLoader workers;
unreadable clips are counted and listed, never cached. Under torchrun each rank encodes every world_size-th
window on its own GPU (ranks write disjoint entries, so no process group is needed).

    safe cache-features --data-root DIR [--model-config llava-1.5-7b] [--use-wavcaps] [--num-workers 8]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from safe.data.audio import AudioLoadError, audio_info, load_audio, window_count
from safe.diskspace import DiskFullError, check_free_space, disk_full_error
from safe.errors import SafeError


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="the runs' YAML settings file (data root, model, WavCaps); flags override it")
    add("--data-root", help="the data root (README layout)")
    add("--model-config", "--preset", dest="model_config",
        help="model preset whose audio encoder is used: tiny, llava-1.5-7b, llava-1.5-13b (default tiny)")
    add("--audio-encoder", help="clap, whisper, or a hub id / local path (as for `safe train`)")
    add("--use-wavcaps", action="store_true", help="also cache the WavCaps training clips")
    add("--wavcaps-ratio", type=float, help="the WavCaps fraction the runs will use (a seeded subset)")
    add("--seed", type=int, help="the runs' seed (it picks the WavCaps subset)")
    add("--eval-splits", default="val", help="comma-separated AudioCaps splits cached at their evaluation window")
    add("--feature-cache-dir", help="cache folder (default $SAFE_CACHE_DIR/features, as `safe train`)")
    add("--batch-size", type=int, default=32, help="clips per encoder call")
    add("--num-workers", type=int, default=4, help="decoding worker processes")
    add("--device", help="cuda, cuda:N or cpu (default: the local GPU when there is one)")
    add("--allow-outside-paths", action="store_true", help="accept absolute or escaping media paths in manifests")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from safe.config import build_config
    from safe.models.factory import build_audio_encoder
    from safe.training.model_factory import preset_for

    from safe.config import load_yaml

    config = build_config(load_yaml(args.config) if args.config else None, cli_values={
        "model_config": args.model_config, "audio_encoder": args.audio_encoder, "data_root": args.data_root,
        "use_wavcaps": args.use_wavcaps or None, "wavcaps_ratio": args.wavcaps_ratio, "seed": args.seed,
        "allow_outside_paths": args.allow_outside_paths or None, "feature_cache_dir": args.feature_cache_dir})
    if not Path(config.data.data_root).is_dir():
        raise SafeError(f"Data root {config.data.data_root} does not exist; pass --data-root (or a --config with "
                        "data_root) pointing at the staged data.")
    if args.batch_size < 1 or args.num_workers < 0:
        raise SafeError("--batch-size must be >= 1 and --num-workers >= 0.")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    encoder = build_audio_encoder(preset_for(config), device)
    from safe.data.feature_cache import encoder_cache_id

    # Entries are keyed by the encoder's dtype: bf16 on GPU, fp32 on CPU, as `safe train` loads it on each.
    print(f"encoder {encoder_cache_id(encoder)} on {device}: read by runs whose encoder runs in the same dtype "
          f"({'GPU' if device.type == 'cuda' else 'CPU'} training)")
    summary = cache_features(config, encoder, [s for s in args.eval_splits.split(",") if s], args.batch_size,
                             args.num_workers, rank, world_size, progress=args.progress)
    print(f"{summary['encoded']} windows encoded, {summary['already_cached']} already cached "
          f"({summary['clips']} clips, {summary['windows']} windows; rank {rank}/{world_size}) "
          f"in {summary['seconds']:.1f} s -> {summary['cache']}")
    if summary["unreadable"]:
        shown = "\n  ".join(summary["unreadable"][:10])
        more = f"\n  ... and {len(summary['unreadable']) - 10} more" if len(summary["unreadable"]) > 10 else ""
        print(f"{len(summary['unreadable'])} unreadable clip(s) skipped (training skips them too):\n  {shown}{more}")
    return 0


def cache_features(config, encoder, eval_splits: list[str], batch_size: int = 32, num_workers: int = 4,
                   rank: int = 0, world_size: int = 1, progress: bool = True) -> dict:
    """Encode every (clip, window) the run will read that is not cached yet; returns the counts."""
    from tqdm import tqdm

    from safe.data.feature_cache import FeatureCache

    started = time.perf_counter()
    cache = FeatureCache.for_encoder(encoder, config.data.feature_cache_dir, memory_mb=0)
    clips, unreadable = planned_windows(config, encoder.sample_rate, encoder.clip_seconds, eval_splits)
    windows = sorted((path, window) for path, count in clips.items() for window in range(count))
    mine = windows[rank::world_size]
    pending = [pair for pair in mine if not cache.contains(*pair)]
    loader = DataLoader(_Windows(pending, encoder.sample_rate, encoder.clip_seconds), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=encoder.device.type == "cuda")
    encoded = 0
    with tqdm(total=len(pending), desc="cache features", unit="clip", disable=not progress) as bar:
        for batch in loader:
            unreadable += batch["unreadable"]
            if batch["audio"] is not None:
                features = encoder(batch["audio"].to(encoder.device, non_blocking=True))
                # The first batch tells what an entry takes: refuse at once when the rest cannot fit.
                needed = cache.entry_bytes(features[0]) * (len(pending) - encoded)
                kept = "entries already written are kept, so the same command continues from there"
                if not encoded:
                    check_free_space(cache.root, needed, kept)
                try:
                    for row, (path, window) in enumerate(batch["pairs"]):
                        cache.put(path, window, features[row])
                        encoded += 1
                except DiskFullError:
                    raise disk_full_error(cache.root, needed, kept) from None
            bar.update(len(batch["pairs"]) + len(batch["unreadable"]))
    return {"clips": len(clips), "windows": len(windows), "encoded": encoded,
            "already_cached": len(mine) - len(pending), "unreadable": sorted(set(unreadable)),
            "seconds": time.perf_counter() - started, "cache": str(cache.root)}


def planned_windows(config, sample_rate: int, clip_seconds: float, eval_splits: list[str]) -> tuple[dict, list]:
    """{clip path: number of windows to cache} over the run's training and evaluation clips, and unreadable clips.

    Training clips get all their training windows (safe.data.audio.window_starts); evaluation clips window 0."""
    from safe.data.datasets import AudioCapsDataset, WavCapsDataset

    data = config.data
    common = dict(sample_rate=sample_rate, clip_seconds=clip_seconds, seed=config.train.seed,
                  allow_outside_paths=data.allow_outside_paths)
    train = [AudioCapsDataset(data.data_root, "train", training=True, **common)]
    if data.use_wavcaps:
        train.append(WavCapsDataset(data.data_root, "train", ratio=data.wavcaps_ratio, training=True, **common))
    evaluation = [AudioCapsDataset(data.data_root, split, training=False, **common) for split in eval_splits]
    clips: dict[str, int] = {}
    unreadable: list[str] = []
    for dataset in train + evaluation:
        for item in dataset.items:
            path = str(item["path"])
            try:
                count = window_count(audio_info(path), clip_seconds) if dataset.training else 1
            except AudioLoadError:
                unreadable.append(path)
                continue
            clips[path] = max(clips.get(path, 0), count)
    return clips, unreadable


class _Windows(Dataset):
    """(clip, window) pairs decoded to the encoder's rate and clip length; unreadable ones come back marked."""

    def __init__(self, pairs: list[tuple[str, int]], sample_rate: int, clip_seconds: float):
        self.pairs, self.sample_rate, self.clip_seconds = pairs, sample_rate, clip_seconds

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        path, window = self.pairs[index]
        try:
            return {"pair": (path, window),
                    "audio": load_audio(path, self.sample_rate, self.clip_seconds, window_index=window)}
        except AudioLoadError:
            return {"pair": (path, window), "audio": None}


def _collate(items: list[dict]) -> dict:
    good = [item for item in items if item["audio"] is not None]
    return {"pairs": [item["pair"] for item in good],
            "audio": torch.from_numpy(np.stack([item["audio"] for item in good])) if good else None,
            "unreadable": [item["pair"][0] for item in items if item["audio"] is None]}
