"""Repair WavCaps audio paths: `python scripts/fix_wavcaps_paths.py --wavcaps-dir DIR [--dry-run]`.

Thin entry point over `safe data fix-wavcaps` (safe/staging/wavcaps_fix.py); same flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's `safe`, wherever this runs from

from safe.staging.wavcaps_fix import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/fix_wavcaps_paths.py"))
