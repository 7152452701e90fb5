"""The `safe` command.

Each subcommand lives in its own module exposing `configure(parser)` and `run(args) -> int`; this file only
routes. User mistakes (SafeError) are printed as one sentence, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from safe.errors import SafeError

# (command path, module, help). Modules are imported only when their command is used or help is built.
COMMANDS = [
    (("train",), "safe.training.cli", "train one Stage A variant"),
    (("sweep",), "safe.training.sweep", "train several variants in sequence and compare them"),
    (("eval",), "safe.eval.cli", "evaluate a run's checkpoint"),
    (("caption",), "safe.inference", "caption audio files with a trained run"),
    (("data", "synth"), "safe.data.synth", "write the deterministic toy world"),
    (("data", "download"), "safe.data.download", "download and extract datasets safely"),
    (("data", "prepare"), "safe.data.prepare", "convert official AudioCaps/VQA/WavCaps files to manifests"),
    (("data", "validate"), "safe.data.validate", "check a whole data root before training"),
    (("data", "fix-wavcaps"), "safe.data.wavcaps_fix", "repair WavCaps audio paths"),
    (("data", "validate-wavcaps"), "safe.data.wavcaps_validate", "check that every WavCaps row loads"),
]


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safe", description="SAFE Stage A: audio for a frozen LLaVA.")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in COMMANDS:
        if not _available(module):
            continue
        subparsers = top
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(dest="subcommand", required=True)
            subparsers = groups[path[0]]
        sub = subparsers.add_parser(path[-1], help=help_text, description=help_text)
        importlib.import_module(module).configure(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except SafeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
