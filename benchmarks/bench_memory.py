"""Peak memory of Stage A training steps (tiny preset), one fresh process per variant.

Per variant: resident memory after the trainer is built (model, data, caches warm), the process high-water mark
(ru_maxrss) after a few steps, the tracemalloc peak of Python-object allocations during those steps (tensor
storage is not Python-allocated and does not show there), torch.cuda.max_memory_allocated on GPU, and the
parameter / optimizer-state bytes for reference (one copy of the base: no duplicate models in memory).

    python benchmarks/bench_memory.py [--steps 3] [--variants no_retention:xattn,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import _common  # noqa: F401
import torch
from _common import peak_rss_mib, toy_world, trainer_config, write_result

DEFAULT_VARIANTS = "no_retention:xattn,no_retention:prefix,soft_retention:xattn"


def current_rss_mib() -> float:
    import os

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(variant: str, fusion: str, steps: int) -> dict:
    from bench_step import fill_caches

    from safe.training.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trainer = Trainer(trainer_config(toy_world(work / "world"), work, variant=variant, fusion=fusion))
        fill_caches(trainer, "warm" if trainer.retention is not None else None)
        trainer.train_step()  # optimizer state and autograd buffers exist from here on
        model = trainer.model
        params = {id(p): p for p in model.parameters()}.values()
        param_mib = sum(p.numel() * p.element_size() for p in params) / 2**20
        trainable_mib = sum(p.numel() * p.element_size() for p in model.trainable_parameters()) / 2**20
        optimizer_mib = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                            for t in s.values() if torch.is_tensor(t)) / 2**20
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rss_before = current_rss_mib()
        tracemalloc.start()
        for _ in range(steps):
            trainer.train_step()
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return {"variant": variant, "fusion": fusion, "steps": steps,
                "rss_before_steps_mib": round(rss_before, 1), "ru_maxrss_mib": round(peak_rss_mib(), 1),
                "step_rss_growth_mib": round(peak_rss_mib() - rss_before, 1),
                "tracemalloc_peak_mib": round(traced_peak / 2**20, 2),
                "cuda_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                "parameters_mib": round(param_mib, 2), "trainable_mib": round(trainable_mib, 3),
                "optimizer_state_mib": round(optimizer_mib, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in the children (the machine line records it)
    if args.child:
        variant, fusion = args.child.split(":")
        print("RESULT " + json.dumps(measure(variant, fusion, args.steps)))
        return
    rows = []
    for spec in args.variants.split(","):
        done = subprocess.run([sys.executable, __file__, "--child", spec, "--steps", str(args.steps)],
                              capture_output=True, text=True, check=False)
        line = [text for text in done.stdout.splitlines() if text.startswith("RESULT ")]
        if done.returncode or not line:
            raise SystemExit(f"memory child {spec} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(line[-1][len("RESULT "):]))
        print(f"{spec}: peak RSS {rows[-1]['ru_maxrss_mib']} MiB, step growth {rows[-1]['step_rss_growth_mib']} MiB, "
              f"tracemalloc peak {rows[-1]['tracemalloc_peak_mib']} MiB", flush=True)
    write_result("memory", {"preset": "tiny", "results": rows}, args.out)


if __name__ == "__main__":
    main()
