"""`safe train` / `run_full_training.py`: the user's flags mapped onto RunConfig (flags override --config YAML)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing

from safe.core.settings import ALL, OFF
from safe.training.config import (
    PRESET_TRAIN_DEFAULTS,
    SECTIONS,
    RunConfig,
    build_config,
    explicit_settings,
    field_index,
    load_yaml,
    preset_train_defaults,
)


def _flag_type(hint) -> tuple[type, bool]:
    """(the scalar type a flag parses, whether it takes a list) of a field's type hint, e.g. int | None -> int."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    inner = [a for a in typing.get_args(hint) if a is not type(None)][0] if union else hint
    if typing.get_origin(inner) is list:
        return typing.get_args(inner)[0], True
    return inner, False


def add_setting(parser: argparse.ArgumentParser, spec: dataclasses.Field, hint) -> None:
    """One flag from one config field: --field-name, its type, its help with the real default. Every flag defaults
    to None (= not given), so the YAML < flags precedence and the preset's and variant's defaults still apply."""
    flag = dict(spec.metadata.get("flag", {}))
    names = flag.pop("names", (f"--{spec.name.replace('_', '-')}",))
    shown = flag.pop("default_text", None)
    if shown is None:
        default = spec.default
        shown = ("on" if default else "off") if isinstance(default, bool) else "none" if default is None else default
    presets = "".join(f"; {name} preset: {values[spec.name]:g}" for name, values in PRESET_TRAIN_DEFAULTS.items()
                      if spec.name in values)
    help_text = f"{spec.metadata['help']} (default {shown}{presets})".replace("%", "%%")
    kind, many = _flag_type(hint)
    if kind is bool:
        parser.add_argument(*names, dest=flag.pop("dest", spec.name), action=argparse.BooleanOptionalAction,
                            default=None, help=help_text, **flag)
        return
    flag.setdefault("type", kind)
    if many:
        flag.setdefault("nargs", "+")
    parser.add_argument(*names, dest=flag.pop("dest", spec.name), default=None, help=help_text, **flag)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of settings; command-line flags override it")
    for section in SECTIONS:
        cls = type(getattr(RunConfig(), section))
        hints = typing.get_type_hints(cls)
        for spec in dataclasses.fields(cls):
            add_setting(parser, spec, hints[spec.name])
    parser.add_argument("--dry-run", action="store_true", help="build the model on the meta device, print "
                        "parameters, memory, tokens, steps and time, check the data, and exit without training")


def _word_flags() -> set[str]:
    """Settings whose flag parser takes a word for None (safe.core.settings.count_or)."""
    return {spec.name for section in SECTIONS for spec in dataclasses.fields(type(getattr(RunConfig(), section)))
            if hasattr(spec.metadata.get("flag", {}).get("type"), "word")}


CONTROL_FLAGS = {"config", "command", "subcommand", "_module", "verbose", "dry_run"}


def config_from_args(args: argparse.Namespace):
    values = {k: v for k, v in vars(args).items() if k not in CONTROL_FLAGS}
    # 'all' / 'off' given to a flag that takes the word (not a run named "all"): None in the config.
    words = _word_flags()
    cleared = {k for k, v in values.items() if v in (ALL, OFF) and k in words}
    values = {k: None if k in cleared else v for k, v in values.items()}
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else None
    if values.get("resume") is None and "preset" not in explicit_settings(yaml_values, values):
        # An unnamed preset follows the data: the toy model on a toy world, LLaVA-1.5-7B on real data (a resumed
        # run keeps its own). Chosen before the config is built, so the preset's own defaults apply.
        from safe.training.config import DEFAULT_DATA_ROOT
        from safe.training.preset_guard import default_preset_for

        root = values.get("data_root") or (yaml_values or {}).get("data_root") or \
            ((yaml_values or {}).get("data") or {}).get("data_root") or DEFAULT_DATA_ROOT
        chosen = default_preset_for(root)
        if chosen is not None:
            values["model_config"] = chosen
            if _is_rank_zero():
                print(f"model: {chosen} (the default on real data; --model-config chooses another, tiny included)")
    config = build_config(yaml_values, values)
    for key in cleared:  # set after the merge: a None flag means "not given"
        setattr(getattr(config, field_index()[key]), key, None)
    # Given, so a resume compares them with the saved run like any other setting (not silently ignored).
    config.explicit = sorted(set(config.explicit) | cleared)
    return config


def _say_preset_defaults(args: argparse.Namespace, config) -> None:
    """Name the preset's training defaults this run takes (they are in config.json as resolved values)."""
    yaml_values = load_yaml(args.config) if getattr(args, "config", None) else None
    taken = preset_train_defaults(config.model.preset, explicit_settings(yaml_values, vars(args)))
    if taken and config.train.resume is None and _is_rank_zero():
        flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in taken.items())
        print(f"{config.model.preset} preset defaults: {flags} (set any of them to override)")


def run(args: argparse.Namespace) -> int:
    from safe.training.distributed import shutdown
    from safe.training.trainer import train  # heavy imports only when training

    config = config_from_args(args)
    _say_preset_defaults(args, config)
    if args.dry_run:
        from safe.training.dry_run import dry_run

        return dry_run(config)
    try:
        result = train(config)
    finally:
        shutdown()
    if not _is_rank_zero():
        return 0
    print(f"run folder: {result['run_dir']} ({result['status']} at step {result['step']})")
    from safe.eval.summary import summary_lines

    print("\n".join(summary_lines(result.get("validation") or {})))
    return 0


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"  # torchrun sets RANK; one process speaks for the run
