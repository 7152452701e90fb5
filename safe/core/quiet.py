"""Library noise off by default.

transformers and huggingface_hub draw progress bars of their own ("Loading weights", "Writing model shards", one per
file fetched) on every command that touches a model; they say nothing a SAFE user acts on, and they bury SAFE's own
output. `--verbose` brings them back. SAFE's own bars (training, feature caching, the tiny base build, downloads by
`safe models download`) are not affected.
"""

from __future__ import annotations

import os
import sys


def library_progress_bars(enabled: bool) -> None:
    """Switch transformers' and huggingface_hub's progress bars on or off for this process."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if enabled and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes"):
        return  # the user's own setting wins
    (enable_progress_bars if enabled else disable_progress_bars)()
    # transformers reads the hub's switch once, at import: set its own too when it is already loaded.
    hf_logging = sys.modules.get("transformers.utils.logging")
    if hf_logging is not None:
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def add_verbose_flag(parser) -> None:
    if not any("--verbose" in action.option_strings for action in parser._actions):
        parser.add_argument("--verbose", action="store_true",
                            help="also show the progress bars of transformers and huggingface_hub")


def note(message: str) -> None:
    """A progress note (a model build, a load): stderr, so a command's own output on stdout stays parseable."""
    print(message, file=sys.stderr, flush=True)
