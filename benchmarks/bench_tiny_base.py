"""The tiny base build: wall time and weights, alone and beside CPU-heavy jobs.

Each build is a fresh child process into an empty cache folder (`ensure_tiny_base`, exactly what a first run does).
"alone" runs with nothing else started by this script; "loaded" runs beside one busy loop per core (a pure-Python
`while True`), the worst case of a shared machine. The build fixes its own thread count, so both must give the same
weight hash (`weights_sha256` in tiny_base.json) and the same accuracy; only the time may differ.

    python benchmarks/bench_tiny_base.py [--rounds 1] [--seed 0]
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
from _common import write_result

BUILD = ("import sys; from safe.models.tiny_base import ensure_tiny_base; "
         "print(ensure_tiny_base(int(sys.argv[1]), sys.argv[2]))")


def build(seed: int, folder: Path) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BUILD, str(seed), str(folder)], capture_output=True, text=True,
                          cwd=_common.ROOT)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    info = json.loads((Path(done.stdout.strip().splitlines()[-1]) / "tiny_base.json").read_text())
    return {"wall_seconds": round(time.perf_counter() - start, 1), "build_seconds": info["build_seconds"],
            "llm_seconds": info["llm_seconds"], "vqa_val_accuracy": info["vqa_val_accuracy"],
            "weights_sha256": info["weights_sha256"], "load_average_before": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    builds: dict[str, list[dict]] = {"alone": [], "loaded": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            builds["alone"].append(build(args.seed, Path(tmp) / f"alone{round_}"))
            loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
            try:
                time.sleep(2)
                builds["loaded"].append(build(args.seed, Path(tmp) / f"loaded{round_}"))
            finally:
                for loop in loops:
                    loop.kill()
    hashes = {b["weights_sha256"] for runs in builds.values() for b in runs}
    write_result("tiny_base", {
        "seed": args.seed, "rounds": args.rounds, "busy_loops": os.cpu_count(), "builds": builds,
        "same_weights": len(hashes) == 1,
        "wall_seconds": {name: [b["wall_seconds"] for b in runs] for name, runs in builds.items()},
        "ratio_loaded_over_alone": round(sum(b["wall_seconds"] for b in builds["loaded"])
                                   / sum(b["wall_seconds"] for b in builds["alone"]), 2)})


if __name__ == "__main__":
    main()
