"""Run every benchmark (`make bench`): each writes benchmarks/results/<name>.json; a summary of ratios is printed.

    python benchmarks/run_all.py [--quick]     # --quick: fewer repeats (a CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick = args.quick
    runs = [
        ("audio_loading", ["bench_audio_loading.py", *(["--clips", "12", "--repeats", "2"] if quick else [])]),
        ("feature_cache", ["bench_feature_cache.py"]),
        ("step", ["bench_step.py", *(["--steps", "5", "--warmup", "2"] if quick else [])]),
        ("teacher", ["bench_teacher.py", *(["--repeats", "3"] if quick else [])]),
        ("eval", ["bench_eval.py", *(["--repeats", "1"] if quick else [])]),
        ("memory", ["bench_memory.py"]),
        ("threads", ["bench_threads.py", *(["--rounds", "1", "--steps", "10"] if quick else [])]),
        ("tiny_base", ["bench_tiny_base.py"]),
    ]
    summary, failed = {}, []
    for name, command in runs:
        started = time.perf_counter()
        print(f"== {name}: {' '.join(command)}", flush=True)
        done = subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], cwd=HERE.parent)
        if done.returncode:
            failed.append(name)
            continue
        result = json.loads((HERE / "results" / f"{name}.json").read_text())
        keys = [k for k in result if k.startswith("ratio") or k.endswith("speedup")]
        summary[name] = {k: result[k] for k in keys}
        summary[name]["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, indent=2))
    if failed:
        raise SystemExit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
