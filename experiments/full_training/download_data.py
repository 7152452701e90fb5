"""Stage the datasets: `python -m experiments.full_training.download_data --audiocaps-url URL --vqa-url URL`.

Thin entry point over `safe data download` (safe/staging/download.py); same flags. Also runs as a script path.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python experiments/full_training/download_data.py`: make the repository's `safe` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safe.staging.download import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python -m experiments.full_training.download_data"))
