"""Evaluation time with a cold vs a warm base-prediction cache (BasePredictionCache; docs/design.md, "Caches and
their keys").

The VQA pass of an evaluation generates three answer sets: SAFE (gate 1, no audio), SAFE with a distractor
clip, and the base (gate 0). The base answers depend only on (base model, manifest, prompt, decoding), so the
cache computes them once for every later evaluation and every variant of a sweep. Timed on the small toy world
with the tiny preset: the VQA pass (Evaluator._vqa) and the whole evaluation (Evaluator.run, which also caches
the muted caption control; --full, slow), each cold (empty cache directory) and warm. An untimed pass
first warms the feature cache (distractor clips) and imports, so only the base cache differs.

    python benchmarks/bench_eval.py [--repeats 3] [--threads 1] [--max-new-tokens 32] [--full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import torch
from _common import median, toy_world, trainer_config, write_result


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--full", action="store_true",
                        help="also time whole evaluations (captions too; slow: caption metrics dominate)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from safe.training.evaluator import BasePredictionCache
    from safe.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = toy_world(work / "world")
        config = trainer_config(world, work, variant="no_retention", max_vl_eval_samples=None,
                                max_audio_eval_samples=None, generation_max_new_tokens=args.max_new_tokens,
                                val_batch_size=16)
        trainer = Trainer(config)
        evaluator = trainer.evaluator
        evaluator.run_dir = None  # no prediction files: time the computation only

        def use_cache(name: str) -> BasePredictionCache:
            evaluator.base_cache = BasePredictionCache(trainer.model, evaluator.decoding, directory=work / name)
            return evaluator.base_cache

        use_cache("warmup")
        evaluator._vqa()  # untimed: fills the feature cache with the distractor clips
        use_cache("vqa")
        vqa_cold = timed(evaluator._vqa)
        vqa_warm = median([timed(evaluator._vqa) for _ in range(args.repeats)])
        hits = evaluator.base_cache.hits
        full = {}
        if args.full:
            use_cache("full")
            cold = timed(lambda: evaluator.run(0))
            warm = timed(lambda: evaluator.run(0))
            full = {"full_eval_cold_s": round(cold, 3), "full_eval_warm_s": round(warm, 3),
                    "full_eval_speedup": round(cold / warm, 3)}
        questions = len(evaluator.vqa_val)

    write_result("eval", {
        "preset": "tiny", "world": "small", "threads": args.threads, "vqa_questions": questions,
        "audio_clips": None if evaluator.audio_val is None else len(evaluator.audio_val),
        "decoding": evaluator.decoding,
        "vqa_pass_cold_s": round(vqa_cold, 3), "vqa_pass_warm_s": round(vqa_warm, 3),
        "vqa_speedup": round(vqa_cold / vqa_warm, 3), "vqa_warm_over_cold": round(vqa_warm / vqa_cold, 3),
        "vqa_warm_cache_hits": hits,
        **full,
        "note": "warm = base answers (and muted caption control) read from the cache; SAFE answers are "
                "always generated (the trainable part changes between evaluations)",
    }, args.out)


if __name__ == "__main__":
    main()
