"""Shared plumbing of the benchmarks: machine description, result files, toy world, trainer set-up, timers.

Every benchmark measures its numerator and denominator in the same process on the same machine, interleaved
where it can, and reports the median of several repeats (the machine may be shared: medians resist a noisy
neighbour better than means, and interleaving spreads any slowdown over both sides of a ratio).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line naming where a number came from (the README table quotes it)."""
    import torch

    parts = [f"{cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})"]
    if torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(0))
    parts.append(f"{platform.system()} {platform.machine()}, torch {torch.__version__}")
    return "; ".join(parts)


def write_result(name: str, result: dict, out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), **result}
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def toy_world(directory: Path) -> Path:
    from safe.toy.world import synthesize_toy_world

    if not (directory / "toy_world.json").is_file():
        synthesize_toy_world(directory, seed=0, size="small")
    return directory


def trainer_config(data_root: Path, work: Path, **overrides):
    """A quiet tiny-preset run config with private caches (nothing written to ~/.cache/safe)."""
    from safe.training.config import build_config

    values = {"model_config": "tiny", "data_root": str(data_root), "output_root": str(work / "runs"),
              "feature_cache_dir": str(work / "features"), "base_work_cache_dir": str(work / "base_work"),
              "train_batch_size": 8, "num_workers": 0,
              "progress": False, "tensorboard": False, "max_steps": 10_000, "max_audio_eval_samples": 8,
              "max_vl_eval_samples": 8, "generation_max_new_tokens": 8}
    values.update(overrides)
    return build_config(cli_values=values)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


class Timers:
    """Named wall-clock accumulators; `section(name)` adds the time spent inside the block."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextmanager
    def section(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def wrap(self, name: str, fn):
        def wrapped(*args, **kwargs):
            with self.section(name):
                return fn(*args, **kwargs)
        return wrapped

    def reset(self) -> dict[str, float]:
        totals, self.totals = self.totals, {}
        return totals


def peak_rss_mib() -> float:
    """ru_maxrss of this process (KiB on Linux) in MiB: the high-water mark since the process started."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
