"""Train one Stage A variant (thin entry point over `safe train`).

    python experiments/full_training/run_full_training.py --variant soft_retention [--use-wavcaps --wavcaps-ratio 0.5]
    python -m experiments.full_training.run_full_training ...
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safe.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
