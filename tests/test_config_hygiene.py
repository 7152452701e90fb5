"""Settings from YAML files, config.json and flags are checked against the dataclass field types, one sentence per
bad key, and numbers that make no sense (non-finite, negative, a zero temperature) are refused."""

import dataclasses
import math
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

from safe.core.errors import SafeError
from safe.training.config import SECTIONS, RunConfig, build_config, load_yaml

REPO = Path(__file__).resolve().parents[1]


def from_yaml(tmp_path, text: str) -> RunConfig:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return build_config(load_yaml(path))


def test_a_string_for_a_boolean_is_refused(tmp_path):
    # YAML 1.1 reads an unquoted `no` as false; a quoted "no" is a string, which used to read as true.
    with pytest.raises(SafeError, match=r"use_wavcaps must be true or false, not 'no'"):
        from_yaml(tmp_path, 'use_wavcaps: "no"\n')
    assert from_yaml(tmp_path, "use_wavcaps: no\n").data.use_wavcaps is False


def test_wrong_types_are_one_sentence_each_not_a_traceback(tmp_path):
    with pytest.raises(SafeError) as caught:
        from_yaml(tmp_path, 'train:\n  train_batch_size: "8"\n  seed: 1.5\n  run_name: 2024\n'
                            'model:\n  xattn_layers: [6, "x"]\n')
    message = str(caught.value)
    assert "from the config file" in message
    assert "train_batch_size must be an integer, not '8'." in message
    assert "seed must be an integer, not 1.5." in message
    assert "run_name must be a string, not 2024." in message
    assert "xattn_layers must be a list of integers, not [6, 'x']." in message


def test_none_only_where_the_field_is_optional(tmp_path):
    assert from_yaml(tmp_path, "max_steps: null\nwarmup_steps: null\n").train.max_steps is None
    with pytest.raises(SafeError, match="train_batch_size needs a value"):
        from_yaml(tmp_path, "train_batch_size: null\n")


def test_ints_are_accepted_for_floats_and_yaml_exponents_read_as_numbers(tmp_path):
    config = from_yaml(tmp_path, "lr_adapter: 1\nlr_projector: 3e-4\nkl_weight: 2\n")
    # PyYAML reads `3e-4` (no dot) as a string; a float field takes it as the number it spells.
    assert config.train.lr_adapter == 1.0 and isinstance(config.train.lr_adapter, float)
    assert config.train.lr_projector == 3e-4 and isinstance(config.retention.kl_weight, float)
    with pytest.raises(SafeError, match="lr_adapter must be a number, not 'fast'"):
        from_yaml(tmp_path, "lr_adapter: fast\n")


@pytest.mark.parametrize("text, sentence", [
    ("lr_projector: .nan\n", "lr_projector must be a finite number, not nan."),
    ("lr_adapter: .inf\n", "lr_adapter must be a finite number, not inf."),
    ("weight_decay: -0.01\n", "weight_decay must be >= 0, not -0.01."),
    ("warmup_steps: -5\n", "warmup_steps must be >= 0, not -5."),
    ("kl_temperature: 0\n", "kl_temperature must be > 0, not 0.0."),
    ("grad_clip: 0\n", "grad_clip must be > 0, not 0.0."),
    ("label_smoothing: 1.5\n", "label_smoothing must be at most 1, not 1.5."),
    ("seed: -1\n", "seed must be >= 0, not -1."),
    ("kl_weight: -1\n", "kl_weight must be >= 0, not -1.0."),
])
def test_numbers_that_make_no_sense_are_refused(tmp_path, text, sentence):
    with pytest.raises(SafeError) as caught:
        from_yaml(tmp_path, text)
    assert sentence in str(caught.value)


def test_flags_are_checked_like_the_file():
    with pytest.raises(SafeError, match="from the command line: lr_adapter must be a finite number, not nan"):
        build_config(cli_values={"lr_adapter": math.nan})


def test_every_field_is_type_checked_so_new_fields_are_covered():
    """Walk the dataclasses: a value of the wrong kind is refused for every field, its own default accepted."""
    defaults = RunConfig()
    hints = {section: typing.get_type_hints(type(getattr(defaults, section))) for section in SECTIONS}
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(defaults, section)):
            kind = hints[section][f.name]
            if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: the X
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            # lists get a string, mappings (which also take the flag's text) a number
            fallback = 3 if typing.get_origin(kind) is dict else "x"
            wrong = {bool: "yes", int: "3", float: [1.0], str: 3}.get(kind, fallback)
            with pytest.raises(SafeError, match=rf"{f.name} must be"):
                RunConfig.from_dict({f.name: wrong})
    assert RunConfig.from_dict(defaults.to_dict()).to_dict() == defaults.to_dict()  # config.json round trip


def test_cli_reports_a_bad_settings_file_in_one_sentence(tmp_path):
    settings = tmp_path / "bad.yaml"
    settings.write_text('use_wavcaps: "no"\nlr_adapter: .nan\n')
    done = subprocess.run([sys.executable, "-m", "safe.cli", "train", "--config", str(settings), "--data-root",
                           str(tmp_path / "no-data"), "--output-root", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "use_wavcaps must be true or false, not 'no'." in done.stderr
    assert "lr_adapter must be a finite number, not nan." in done.stderr
