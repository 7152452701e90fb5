"""`safe cache-base`: fill the base-work cache ahead of a sweep (safe.retention.base_work).

Every VQA training question gets the frozen base's greedy answer and the teacher's answer-position logits, computed
once for every variant and run of the same base (KL retention then runs only the student). The base is loaded
exactly as `safe train` loads it, and entries are keyed by what they depend on, so a run with the same base, prompt,
dtype, device type and VL batch size (`--train-batch-size`) finds them. Questions already cached are skipped, so an
interrupted run resumes from its last written shard. Images are decoded and preprocessed by DataLoader workers. Under
torchrun each rank answers every world_size-th question on its own GPU (ranks write their own shards: no process
group is needed).

    safe cache-base --data-root DIR [--model-config llava-1.5-7b] [--train-batch-size 8] [--num-workers 4]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from safe.core.errors import SafeError


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--config", help="the runs' YAML settings file (data root, model, batch size); flags override it")
    add("--data-root", help="the data root (README layout)")
    add("--model-config", "--preset", dest="model_config",
        help="model preset: tiny, llava-1.5-7b, llava-1.5-13b (default tiny)")
    add("--base-model", help="hub id or local path of the base LLaVA, overriding the preset")
    add("--train-batch-size", type=int, help="the runs' per-GPU batch size: entries are keyed by it (default 8)")
    add("--generation-max-new-tokens", type=int, help="the runs' answer length limit (default 32)")
    add("--teacher-top-k", type=int, help="as for `safe train` (default 0: the teacher's logits exactly)")
    add("--base-work-cache-dir", help="cache folder (default $SAFE_CACHE_DIR/base_work, as `safe train`)")
    add("--max-questions", type=int, help="only the first N training questions (a trial run)")
    add("--shard-mb", type=float, default=64, help="size of the cache's shard files (default 64 MiB)")
    add("--num-workers", type=int, default=4, help="image decoding worker processes")
    add("--device", help="cuda, cuda:N or cpu (default: the local GPU when there is one)")
    add("--allow-outside-paths", action="store_true", help="accept absolute or escaping media paths in manifests")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from safe.training.config import build_config, load_yaml
    from safe.training.model_factory import build_model

    config = build_config(load_yaml(args.config) if args.config else None, cli_values={
        "variant": "soft_retention", "model_config": args.model_config, "base_model": args.base_model,
        "data_root": args.data_root, "train_batch_size": args.train_batch_size,
        "generation_max_new_tokens": args.generation_max_new_tokens, "teacher_top_k": args.teacher_top_k,
        "base_work_cache_dir": args.base_work_cache_dir, "allow_outside_paths": args.allow_outside_paths or None})
    if not Path(config.data.data_root).is_dir():
        raise SafeError(f"Data root {config.data.data_root} does not exist; pass --data-root (or a --config with "
                        "data_root) pointing at the staged data.")
    if args.num_workers < 0 or args.shard_mb <= 0 or (args.max_questions is not None and args.max_questions < 1):
        raise SafeError("--num-workers must be >= 0, --shard-mb > 0 and --max-questions >= 1.")
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available()
                                          else "cpu"))
    model = build_model(config, device)
    summary = cache_base(config, model, rank, world_size, args.num_workers, args.max_questions, args.progress,
                         shard_bytes=int(args.shard_mb * 2**20))
    print(f"{summary['computed']} questions answered, {summary['already_cached']} already cached "
          f"({summary['questions']} questions; rank {rank}/{world_size}) in {summary['seconds']:.1f} s "
          f"-> {summary['cache']}")
    return 0


def cache_base(config, model, rank: int = 0, world_size: int = 1, num_workers: int = 0,
               max_questions: int | None = None, progress: bool = True, shard_bytes: int | None = None) -> dict:
    """Answer every training question of this rank's share that is not cached yet; returns the counts."""
    from tqdm import tqdm

    from safe.data.collate import collate_samples
    from safe.data.datasets import VQADataset
    from safe.retention.base_work import BaseWorkCache

    started = time.perf_counter()
    settings, train = config.retention, config.train
    cache = BaseWorkCache(model, train.generation_max_new_tokens, train.train_batch_size, config.data.data_root,
                          settings.base_work_cache_dir, settings.teacher_top_k, settings.kl_temperature,
                          **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    dataset = VQADataset(config.data.data_root, "train", allow_outside_paths=config.data.allow_outside_paths)
    dataset.image_processor = model.builder.image_processor
    items = dataset.items[:max_questions] if max_questions else dataset.items
    mine = list(range(len(items)))[rank::world_size]
    pending = [i for i in mine if not cache.contains(str(items[i]["path"]), items[i]["question_id"],
                                                     items[i]["question"])]
    loader = DataLoader(Subset(dataset, pending), batch_size=train.train_batch_size, num_workers=num_workers,
                        collate_fn=collate_samples, pin_memory=model.device.type == "cuda")
    computed, skipped = 0, 0
    model.eval()
    with tqdm(total=len(pending), desc="cache base", unit="question", disable=not progress) as bar:
        for collated in loader:
            skipped += len(collated.skipped)
            if collated.size:
                computed += cache.fill(collated)
            bar.update(collated.size + len(collated.skipped))
    cache.flush()
    return {"questions": len(items), "mine": len(mine), "computed": computed,
            "already_cached": len(mine) - len(pending), "unreadable": skipped,
            "seconds": time.perf_counter() - started, "cache": str(cache.root)}
