"""`safe cache-features`: fill the frozen audio-feature cache before training (docs/design.md, "Caches and their
keys").

The first window of every training clip (AudioCaps train, plus WavCaps with --use-wavcaps; `--windows all|N` for
more of a long clip's training windows, which training otherwise caches lazily as it draws them) and of each
evaluation clip is encoded by the run's frozen encoder (loaded exactly as `safe train` loads it), averaged to the
projector's pre-pool grid and written to the same cache `safe train` reads, so the first epoch already skips the
encoder. The estimated size is printed before anything is written, and the command refuses to start when the disk
cannot hold it. Entries already in the cache are skipped, so an interrupted run resumes from its last written shard;
after the data root moved, a run encodes nothing and records the clips' new locations. Clips are decoded by
DataLoader workers; unreadable clips are counted and listed, never cached. Under torchrun each rank encodes every
world_size-th window on its own GPU (ranks write their own shards, so no process group is needed).

    safe cache-features --data-root DIR [--model-config llava-1.5-7b] [--use-wavcaps] [--windows first|all|N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from safe.core.diskspace import DiskFullError, check_free_space, disk_full_error, free_bytes, human_size
from safe.core.errors import SafeError
from safe.data.audio import AudioLoadError, audio_info, load_audio, window_count


def window_policy(text: str) -> int | None:
    """--windows: 'first' (1), 'all' (None: every training window) or a count N >= 1."""
    text = str(text).strip().lower()
    if text == "first":
        return 1
    if text == "all":
        return None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise argparse.ArgumentTypeError(f"expected first, all or a number >= 1, not {text!r}")


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
    add("--windows", type=window_policy, default=1, metavar="first|all|N",
        help="training windows cached per clip: the first (default; training caches the others lazily as it draws "
             "them), all of them, or the first N")
    add("--shard-mb", type=float, default=64, help="size of the cache's shard files (default 64 MiB)")
    add("--batch-size", type=int, default=32, help="clips per encoder call")
    add("--num-workers", type=int, default=4, help="decoding worker processes")
    add("--device", help="cuda, cuda:N or cpu (default: the local GPU when there is one)")
    add("--allow-outside-paths", action="store_true", help="accept absolute or escaping media paths in manifests")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from safe.models.factory import build_audio_encoder
    from safe.training.config import build_config, load_yaml

    config = build_config(load_yaml(args.config) if args.config else None, cli_values={
        "model_config": args.model_config, "audio_encoder": args.audio_encoder, "data_root": args.data_root,
        "use_wavcaps": args.use_wavcaps or None, "wavcaps_ratio": args.wavcaps_ratio, "seed": args.seed,
        "allow_outside_paths": args.allow_outside_paths or None, "feature_cache_dir": args.feature_cache_dir})
    if not Path(config.data.data_root).is_dir():
        raise SafeError(f"Data root {config.data.data_root} does not exist; pass --data-root (or a --config with "
                        "data_root) pointing at the staged data.")
    if args.batch_size < 1 or args.num_workers < 0 or args.shard_mb <= 0:
        raise SafeError("--batch-size must be >= 1, --num-workers >= 0 and --shard-mb > 0.")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    encoder = build_audio_encoder(config.model, device)
    from safe.data.feature_cache import encoder_cache_id

    # Entries are keyed by the encoder's dtype: bf16 on GPU, fp32 on CPU, as `safe train` loads it on each.
    print(f"encoder {encoder_cache_id(encoder)} on {device}: read by runs whose encoder runs in the same dtype "
          f"({'GPU' if device.type == 'cuda' else 'CPU'} training)")
    summary = cache_features(config, encoder, [s for s in args.eval_splits.split(",") if s], args.batch_size,
                             args.num_workers, rank, world_size, progress=args.progress, windows=args.windows,
                             shard_bytes=int(args.shard_mb * 2**20))
    print(f"{summary['encoded']} windows encoded, {summary['already_cached']} already cached "
          f"({summary['clips']} clips, {summary['windows']} windows; rank {rank}/{world_size}) "
          f"in {summary['seconds']:.1f} s -> {summary['cache']} ({summary['files']} files, "
          f"{human_size(summary['bytes'])})")
    if summary["unreadable"]:
        shown = "\n  ".join(summary["unreadable"][:10])
        more = f"\n  ... and {len(summary['unreadable']) - 10} more" if len(summary["unreadable"]) > 10 else ""
        print(f"{len(summary['unreadable'])} unreadable clip(s) skipped (training skips them too):\n  {shown}{more}")
    return 0


def cache_features(config, encoder, eval_splits: list[str], batch_size: int = 32, num_workers: int = 4,
                   rank: int = 0, world_size: int = 1, progress: bool = True, windows: int | None = 1,
                   shard_bytes: int | None = None) -> dict:
    """Encode every (clip, window) planned (``windows``: per training clip, None for all) that is not cached yet;
    returns the counts."""
    from tqdm import tqdm

    from safe.models.projector import pre_pool
    from safe.training.features import run_feature_cache

    started = time.perf_counter()
    cache = run_feature_cache(config, encoder, memory_mb=0, **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    clips, unreadable = planned_windows(config, encoder.sample_rate, encoder.clip_seconds, eval_splits, windows)
    planned = sorted((path, window) for path, count in clips.items() for window in range(count))
    mine = planned[rank::world_size]
    pending = [pair for pair in tqdm(mine, desc="look up", unit="clip", disable=not progress or len(mine) < 1000)
               if not cache.contains(*pair)]
    silence = torch.zeros(1, encoder.clip_samples, device=encoder.device)
    entry = cache.entry_bytes(pre_pool(encoder(silence), cache.grid)[0])  # the size of every entry
    needed = entry * len(pending)
    kept = "entries already written are kept, so the same command continues from there"
    print(f"{len(pending)} of {len(mine)} windows to encode: about {human_size(needed)} ({human_size(entry)} a window, "
          f"{human_size(free_bytes(cache.root))} free) -> {cache.root}", flush=True)
    check_free_space(cache.root, needed, kept)
    loader = DataLoader(_Windows(pending, encoder.sample_rate, encoder.clip_seconds), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate, pin_memory=encoder.device.type == "cuda")
    encoded = 0
    try:
        with tqdm(total=len(pending), desc="cache features", unit="clip", disable=not progress) as bar:
            for batch in loader:
                unreadable += batch["unreadable"]
                if batch["audio"] is not None:
                    features = pre_pool(encoder(batch["audio"].to(encoder.device, non_blocking=True)), cache.grid)
                    for row, (path, window) in enumerate(batch["pairs"]):
                        cache.put(path, window, features[row])
                        encoded += 1
                bar.update(len(batch["pairs"]) + len(batch["unreadable"]))
        cache.flush()
    except DiskFullError:
        raise disk_full_error(cache.root, entry * (len(pending) - encoded), kept) from None
    files = cache.store.files()
    return {"clips": len(clips), "windows": len(planned), "encoded": encoded,
            "already_cached": len(mine) - len(pending), "unreadable": sorted(set(unreadable)),
            "seconds": time.perf_counter() - started, "cache": str(cache.root), "entry_bytes": entry,
            "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def planned_windows(config, sample_rate: int, clip_seconds: float, eval_splits: list[str],
                    windows: int | None = None) -> tuple[dict, list]:
    """{clip path: number of windows to cache} over the run's training and evaluation clips, and unreadable clips.

    Training clips get their first ``windows`` training windows (safe.data.audio.window_starts; None: all of them);
    evaluation clips window 0."""
    from safe.data.datasets import AudioCapsDataset, WavCapsDataset

    data = config.data
    common = dict(sample_rate=sample_rate, clip_seconds=clip_seconds, seed=config.train.seed,
                  allow_outside_paths=data.allow_outside_paths)
    train: list = [AudioCapsDataset(data.data_root, "train", training=True, **common)]
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
                count = count if windows is None else min(count, windows)
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
