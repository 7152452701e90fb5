"""Check WavCaps before training: `python scripts/validate_wavcaps.py --wavcaps-dir DIR [--test-loading
--num-samples N] [--quick]`.

Thin entry point over `safe data validate-wavcaps` (safe/staging/wavcaps_validate.py); same flags.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's `safe`, wherever this runs from

from safe.staging.wavcaps_validate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/validate_wavcaps.py"))
