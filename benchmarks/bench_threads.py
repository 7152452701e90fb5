"""Intra-op threads for the tiny preset: a training step on 1 thread vs on all cores, alone and with two jobs at once.

Each measurement is a child process that builds a tiny-preset trainer (no_retention, xattn, batch 8, serial loading,
a warm feature cache), then times `--steps` training steps on the given number of torch intra-op threads. "alone": one
child; "two jobs": two children started together (what a shared development machine or two test processes do).
Rounds interleave the four configurations. Loader workers are not measured here: torch sets each DataLoader worker to
one intra-op thread itself (torch.utils.data._utils.worker), which is what a decode-bound worker wants.

    python benchmarks/bench_threads.py [--rounds 2] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import median, toy_world, trainer_config, write_result


def child(threads: int, steps: int, work: Path) -> None:
    import torch
    from bench_step import fill_caches

    from safe.training.trainer import Trainer

    trainer = Trainer(trainer_config(toy_world(work / "world"), work / f"run{os.getpid()}", variant="no_retention"))
    fill_caches(trainer, None)
    torch.set_num_threads(threads)  # after the build: this is the setting the steps run on
    for _ in range(5):
        trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"threads": torch.get_num_threads(), "step_ms": median(times) * 1000}))


def run_children(threads: int, jobs: int, steps: int, work: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--child", str(threads), "--steps", str(steps), "--work", str(work)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
             for _ in range(jobs)]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate(timeout=900)
        if proc.returncode:
            raise SystemExit(f"child failed ({proc.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1])["step_ms"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.steps, args.work)
        return
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        toy_world(work / "world")
        for round_index in range(args.rounds):
            for threads in sorted({1, cores}):
                for jobs in (1, 2):
                    name = f"threads{threads}_{'alone' if jobs == 1 else 'two_jobs'}"
                    got = run_children(threads, jobs, args.steps, work)
                    results.setdefault(name, []).extend(got)
                    print(f"round {round_index + 1} {name}: step {', '.join(f'{v:.1f}' for v in got)} ms", flush=True)
    summary = {name: {"median_ms": round(median(v), 2), "range_ms": [round(min(v), 2), round(max(v), 2)]}
               for name, v in results.items()}
    all_cores = f"threads{cores}"
    ratios = {f"{situation}_all_cores_over_1": round(summary[f"{all_cores}_{situation}"]["median_ms"]
                                                     / summary[f"threads1_{situation}"]["median_ms"], 3)
              for situation in ("alone", "two_jobs")} if cores > 1 else {}
    write_result("threads", {"preset": "tiny", "cores": cores, "steps": args.steps, "rounds": args.rounds,
                             "load_average_before": [round(v, 2) for v in load_before],
                             "load_average_after": [round(v, 2) for v in os.getloadavg()],
                             "step_ms": summary, **ratios}, args.out)


if __name__ == "__main__":
    main()
