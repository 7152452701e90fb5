"""Where SAFE caches what never changes for given inputs (tiny base, encoder features, base predictions)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """`$SAFE_CACHE_DIR/<kind>`, or `~/.cache/safe/<kind>` when the variable is unset."""
    root = os.environ.get("SAFE_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "safe") / kind
