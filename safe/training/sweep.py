"""`safe sweep --variants a,b,...`: train variants on the same data, then compare them.

With `--jobs N` the variants train N at a time, each in its own process on cpu_count / N intra-op threads (small
models on a CPU train as fast on one thread as on two, so two variants side by side take the time of one). A run
is deterministic for a given thread count, so `--jobs` changes when results arrive, not what they are, as long as
the thread count per run is the same.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from safe.core.errors import SafeError
from safe.training import cli as train_cli
from safe.training.config import check_variant
from safe.training.report import write_report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", default="no_retention,soft_retention",
                        help="comma-separated variants, trained in this order")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="where the comparison goes (default <output-root>/sweep_<timestamp>)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="variants trained at the same time, each in its own process (default 1)")
    train_cli.configure(parser)


def _configs(args: argparse.Namespace) -> list:
    variants = [check_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    stamp = time.strftime("%Y%m%d_%H%M%S")
    configs = []
    for variant in variants:
        args.variant = variant
        config = train_cli.config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items()
                                                                  if k not in ("variants", "report_dir", "jobs")}))
        if args.jobs > 1 and config.train.run_name is None and config.train.resume is None:
            config.train.run_name = f"{stamp}_{variant}"  # known in advance: the runs train in other processes
        configs.append(config)
    return configs


def _train_here(configs: list) -> list[Path]:
    from safe.training.trainer import train

    runs = []
    for config in configs:
        print(f"== {config.train.variant} ==", flush=True)
        result = train(config)
        if result["status"] != "completed":
            raise SafeError(f"{config.train.variant} was interrupted at step {result['step']}; resume it with "
                            "--resume.")
        runs.append(Path(result["run_dir"]))
    return runs


def _train_in_processes(configs: list, jobs: int) -> list[Path]:
    """Each variant as `safe train --config <its resolved settings>`, `jobs` at a time."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    work = Path(tempfile.mkdtemp(prefix="safe-sweep-"))
    pending, done = list(configs), {}
    running: list = []
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            settings = config.to_dict()
            settings["train"]["progress"] = False
            path = work / f"{config.train.variant}.yaml"
            path.write_text(yaml.safe_dump(settings))
            log = open(work / f"{config.train.variant}.log", "w")
            process = subprocess.Popen([sys.executable, "-m", "safe", "train", "--config", str(path)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT)
            running.append((config, process, log))
            print(f"== {config.train.variant} (process {process.pid}, {threads} thread(s)) ==", flush=True)
        time.sleep(0.5)
        for item in list(running):
            config, process, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            run_dir = Path(config.train.output_root) / config.train.run_name
            if process.returncode != 0:
                for _, other, _ in running:
                    other.terminate()   # the trainer checkpoints on SIGTERM
                tail = (work / f"{config.train.variant}.log").read_text()[-1500:]
                raise SafeError(f"{config.train.variant} stopped with exit code {process.returncode} (its output is in "
                                f"{work / (config.train.variant + '.log')}): {' '.join(tail.split()[-40:])}")
            print(f"== {config.train.variant} done: {run_dir} ==", flush=True)
            done[config.train.variant] = run_dir
    return [done[config.train.variant] for config in configs]


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise SafeError("--jobs must be at least 1.")
    configs = _configs(args)
    if args.dry_run:  # each variant's figures (retention adds VL micro-batches), nothing trained
        from safe.training.dry_run import dry_run

        for config in configs:
            print(f"== {config.train.variant} ==", flush=True)
            dry_run(config)
        return 0
    runs = _train_here(configs) if args.jobs == 1 else _train_in_processes(configs, args.jobs)
    output_root = Path(configs[-1].train.output_root)
    report_dir = args.report_dir or output_root / f"sweep_{time.strftime('%Y%m%d_%H%M%S')}"
    report = write_report(runs, report_dir)
    print(report["markdown"].read_text(), end="")
    print(f"comparison written to {report_dir}")
    return 0
