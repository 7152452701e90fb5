"""Settings declared once (`setting`: a dataclass field with its flag's help) and their type and range checks,
driven by the config dataclasses' fields, so a new field is checked as soon as it is declared.

Values arrive from YAML files, config.json and flags. A value must have its field's type: booleans are true or
false (a string such as "no" is refused, not read as true), integers are integers, a float field also takes an
integer or a numeric string (PyYAML reads `1e-4`, written without a dot, as a string), null only where the field
is Optional, and lists hold their element type. Numbers must be finite and not negative; a few must be strictly
positive or at most 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import field
from typing import Any

# Zero would divide by zero (a temperature) or stop learning (a learning rate, a clipping norm of 0).
POSITIVE = {"lr_projector", "lr_adapter", "kl_temperature", "grad_clip", "clip_seconds"}
# Probabilities and fractions.
AT_MOST_ONE = {"label_smoothing", "wavcaps_ratio", "distractor_prob", "vl_fraction", "lora_dropout"}
# Numeric settings for which a negative value means something; every other number must be >= 0.
MAY_BE_NEGATIVE: set[str] = set()

_BAD = object()
_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURALS = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def _unwrap_optional(kind) -> tuple[object, bool]:
    """(X, True) for `X | None`, (kind, False) otherwise."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
    return kind, False


def _is_list(kind) -> bool:
    return typing.get_origin(kind) in (list, tuple)


def _describe(kind) -> str:
    if typing.get_origin(kind) is dict:
        return "a mapping of names to numbers (or name=number,... text)"
    if _is_list(kind):
        (item, *_) = typing.get_args(kind) or (object,)
        return f"a list of {_PLURALS.get(item, 'values')}"
    return _WORDS.get(kind, f"a {getattr(kind, '__name__', kind)}")


def _convert(kind, value):
    """`value` as a `kind`, or _BAD. Kinds this module does not know are passed through unchecked."""
    if kind is bool:
        return value if isinstance(value, bool) else _BAD
    if kind is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                return _BAD
        return _BAD
    if kind is str:
        return value if isinstance(value, str) else _BAD
    if _is_list(kind):
        if not isinstance(value, (list, tuple)):
            return _BAD
        (item, *_) = typing.get_args(kind) or (object,)
        items = [_convert(item, v) for v in value]
        return _BAD if any(v is _BAD for v in items) else items
    if typing.get_origin(kind) is dict:
        # A mapping of names to numbers, or the flag's "name=number,..." text (parsed by the field's own rules).
        if isinstance(value, str):
            return value
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return _BAD
        numbers = {k: _convert(float, v) for k, v in value.items()}
        return _BAD if any(v is _BAD for v in numbers.values()) else numbers
    return value


def number_problem(name: str, value) -> str | None:
    """The sentence saying why a numeric setting makes no sense, or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value):
        return f"{name} must be a finite number, not {value!r}."
    if name in POSITIVE and value <= 0:
        return f"{name} must be > 0, not {value!r}."
    if value < 0 and name not in MAY_BE_NEGATIVE:
        return f"{name} must be >= 0, not {value!r}."
    if name in AT_MOST_ONE and value > 1:
        return f"{name} must be at most 1, not {value!r}."
    return None


class BadSetting(ValueError):
    """One setting whose value does not fit its field; the message is one sentence."""


def checked_value(section, name: str, value):
    """`value` converted to the declared type of field `name` of the dataclass `section`, and range-checked."""
    cls: type = type(section)
    kind, optional = _unwrap_optional(_field_types(cls)[name])
    if value is None:
        if optional:
            return None
        raise BadSetting(f"{name} needs a value, not null.")
    converted = _convert(kind, value)
    if converted is _BAD:
        raise BadSetting(f"{name} must be {_describe(kind)}, not {value!r}.")
    problem = number_problem(name, converted)
    if problem:
        raise BadSetting(problem)
    return converted


def section_problems(section) -> list[str]:
    """Sentences for the fields of a dataclass instance whose current values do not fit (values set in code)."""
    problems = []
    for f in dataclasses.fields(section):
        try:
            checked_value(section, f.name, getattr(section, f.name))
        except BadSetting as exc:
            problems.append(str(exc))
    return problems


ALL = "all"  # a flag's word for "no limit" (an evaluation over the whole split); the config holds None
OFF = "off"  # a flag's word for a setting that None turns off; the config holds None


def count_or(word: str):
    """A flag's parser: a count of at least 1, or ``word`` (ALL, OFF), which the command maps to None in the config.
    An absent flag is None too ("not given": the YAML's or the preset's value applies), so the word is how a user
    says None on the command line."""
    import argparse

    def parse(text: str):
        if text.strip().lower() == word:
            return word
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or '{word}', not {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1 (or '{word}')")
        return value

    parse.__name__ = f"count or '{word}'"  # argparse names the type in its "invalid ... value" message
    parse.word = word  # type: ignore[attr-defined]  # how a command knows which flags take the word
    return parse


def setting(default, help: str, **flag) -> Any:
    """A config field and its command-line flag in one line: ``help`` is the flag's help; ``flag`` holds what the
    flag needs beyond the field's name, type and default (choices, type, names, dest, nargs, const, default_text).
    `safe train` builds its flags from these (safe.training.cli), so a setting is declared once."""
    if isinstance(default, list):  # a mutable default: each instance gets its own copy
        return field(default_factory=lambda: list(default), metadata={"help": help, "flag": flag})
    return field(default=default, metadata={"help": help, "flag": flag})
