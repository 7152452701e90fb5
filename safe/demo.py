"""`make demo`: the whole pipeline on the embedded default (toy world + tiny model), on CPU, in minutes.

1. synthesise the medium toy world (deterministic; reused when present),
2. build or reuse the cached tiny base (trained once, then frozen),
3. train the five retention variants, two at a time (one thread each),
4. print the comparison table (also written as markdown, CSV and PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from safe.cli import main as safe_main
from safe.toy.world import synthesize_toy_world
from safe.training.config import VARIANTS

DEMO_DIR = Path("demo_out")
# Settings measured to show the toy world's phenomena (docs/design.md, "The toy world") within the time budget
# (see README's table).
DEMO_FLAGS = [
    "--model-config", "tiny",
    "--lora-rank", "8",              # LoRA on the SAFE path: where forgetting really happens (see README)
    "--max-steps", "400",
    "--train-batch-size", "16",
    "--val-batch-size", "50",
    "--lr-projector", "2e-3",
    "--lr-adapter", "6e-3",          # adapters, gates and LoRA: at 2e-3 a stronger base forgot only on some seeds
    "--num-workers", "0",
    "--fisher-samples", "32",
    "--fisher-refresh", "100",
    "--null-space-refresh", "100",
    "--max-audio-eval-samples", "100",
    "--max-vl-eval-samples", "250",
    "--generation-max-new-tokens", "16",
    "--jobs", "2",                   # two variants at a time, one thread each: the 2 cores of a laptop or CI box
]


def ensure_world(data_root: Path, seed: int) -> None:
    meta = data_root / "toy_world.json"
    if meta.is_file() and json.loads(meta.read_text()).get("size") == "medium":
        print(f"toy world: reusing {data_root}")
        return
    started = time.perf_counter()
    synthesize_toy_world(data_root, seed=seed, size="medium")
    print(f"toy world: written to {data_root} in {time.perf_counter() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args, extra = parser.parse_known_args(argv)
    started = time.perf_counter()
    data_root = args.out / "data"
    ensure_world(data_root, args.seed)
    code = safe_main(["sweep", "--variants", args.variants, "--data-root", str(data_root),
                      "--output-root", str(args.out / "runs"), "--seed", str(args.seed),
                      "--report-dir", str(args.out / "comparison"), *DEMO_FLAGS, *extra])
    print(f"demo finished in {time.perf_counter() - started:.0f} s (exit {code}); outputs in {args.out}/")
    return code


if __name__ == "__main__":
    sys.exit(main())
