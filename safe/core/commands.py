"""Running one command module (`configure(parser)` + `run(args) -> int`): a user mistake (SafeError) is one line
on stderr and exit status 2, Ctrl-C says how to resume. `safe` routes to these (safe/cli.py); each command module
can also run as its own program (`standalone`, for the seed entry points under scripts/ and experiments/)."""

from __future__ import annotations

import argparse
import importlib
import sys

from safe.core.errors import SafeError
from safe.core.quiet import add_verbose_flag, library_progress_bars


def run_command(module, args: argparse.Namespace) -> int:
    library_progress_bars(getattr(args, "verbose", False))
    try:
        return int(module.run(args) or 0)
    except SafeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped at once; a training run continues from its last checkpoint with the same command plus "
              "--resume auto (or --resume RUN_DIR)", file=sys.stderr)
        return 130


def standalone(module_name: str, argv: list[str] | None, prog: str, description: str) -> int:
    """One command module as its own program (the seed entry points under scripts/ and experiments/)."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    module.configure(parser)
    add_verbose_flag(parser)
    return run_command(module, parser.parse_args(argv))
