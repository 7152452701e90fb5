"""The `safe` command.

Each subcommand lives in its own module exposing `configure(parser)` and `run(args) -> int`; this file only
routes. User mistakes (SafeError) are printed as one sentence, without a traceback. Every command takes `--verbose`
(the libraries' own progress bars, off by default: safe.core.quiet).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from safe.core.commands import run_command
from safe.core.quiet import add_verbose_flag

# (command path, module, help). A module is imported only when its command is used.
COMMANDS = [
    (("train",), "safe.training.cli", "train one Stage A variant"),
    (("sweep",), "safe.training.sweep", "train several variants in sequence and compare them"),
    (("eval",), "safe.training.eval_cli", "evaluate a run's checkpoint"),
    (("caption",), "safe.inference", "caption audio files with a trained run"),
    (("ask",), "safe.ask", "ask a trained run a visual question, with or without audio"),
    (("report",), "safe.training.report", "compare runs: markdown + CSV table and a PNG"),
    (("export",), "safe.export", "a run's adapter as a shareable folder with a model card"),
    (("cache-features",), "safe.training.cache_features",
     "encode the audio clips into the feature cache ahead of training"),
    (("cache-base",), "safe.training.cache_base", "answer the VQA training questions with the base once for every run"),
    (("data", "synth"), "safe.toy.world", "write the deterministic toy world"),
    (("data", "download"), "safe.staging.download", "download and extract datasets safely"),
    (("data", "prepare"), "safe.staging.prepare", "convert official AudioCaps/VQA/WavCaps/Clotho files to manifests"),
    (("data", "validate"), "safe.staging.validate", "check a whole data root before training"),
    (("data", "fix-wavcaps"), "safe.staging.wavcaps_fix", "repair WavCaps audio paths"),
    (("data", "validate-wavcaps"), "safe.staging.wavcaps_validate", "check that every WavCaps row loads"),
    (("models", "download"), "safe.models.staging", "fetch a preset's base model and audio encoder from the hub"),
    (("metrics", "fetch-spice"), "safe.eval.spice_fetch", "download the Stanford CoreNLP jars SPICE needs"),
]


def _chosen(argv: list[str]) -> tuple[str, ...]:
    """The command path named on the command line (only that module is imported, keeping start-up light)."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for path, _, _ in COMMANDS:
        if tuple(words[: len(path)]) == path:
            return path
    return ()


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="safe", description="SAFE Stage A: audio for a frozen LLaVA.")
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    chosen = _chosen(argv)
    for path, module, help_text in COMMANDS:
        subparsers = top
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(dest="subcommand", required=True)
            subparsers = groups[path[0]]
        sub = subparsers.add_parser(path[-1], help=help_text, description=help_text)
        if path == chosen:
            importlib.import_module(module).configure(sub)
            add_verbose_flag(sub)
        sub.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    return run_command(importlib.import_module(args._module), args)


if __name__ == "__main__":
    sys.exit(main())
