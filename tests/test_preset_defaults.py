"""Toy defaults belong to the tiny preset, and `safe train` refuses the tiny preset on real data unless it is named.

The refusal is checked through the real command in its own process; the defaults through the real config builder
and the real argument parser.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from safe.cli import build_parser
from safe.config import build_config
from safe.errors import SafeError
from safe.training.cli import config_from_args

REPO = Path(__file__).resolve().parents[1]


def parsed(*argv):
    argv = ["train", *map(str, argv)]
    return config_from_args(build_parser(argv).parse_args(argv))


def test_tiny_preset_takes_the_demo_settings_where_the_user_set_none():
    tiny = build_config()
    assert tiny.model.preset == "tiny"
    assert (tiny.train.lr_projector, tiny.train.lr_adapter, tiny.train.max_steps) == (2e-3, 2e-3, 600)
    assert build_config(cli_values={"model_config": "demo"}).train.lr_adapter == 2e-3      # the alias too
    mine = build_config(cli_values={"lr_projector": 5e-4, "max_steps": 7})
    assert (mine.train.lr_projector, mine.train.lr_adapter, mine.train.max_steps) == (5e-4, 2e-3, 7)
    epochs = build_config(cli_values={"num_epochs": 2})
    assert epochs.train.max_steps is None and epochs.train.num_epochs == 2          # epochs asked for: no step cap
    assert build_config({"train": {"lr_adapter": 1e-3}}).train.lr_adapter == 1e-3   # the YAML file counts as set
    real = build_config(cli_values={"model_config": "llava-1.5-7b"})
    assert (real.train.lr_projector, real.train.lr_adapter, real.train.max_steps) == (2e-4, 1e-4, None)
    # What config.json records is the resolved value.
    assert build_config().to_dict()["train"]["lr_projector"] == 2e-3


def real_looking_root(root: Path) -> Path:
    (root / "audiocaps").mkdir(parents=True)
    (root / "audiocaps" / "audiocaps_train.jsonl").write_text("")
    return root


def test_safe_train_refuses_the_default_tiny_preset_on_real_data(tmp_path):
    root = real_looking_root(tmp_path / "audiocaps_data")
    done = subprocess.run([sys.executable, "-m", "safe", "train", "--data-root", str(root),
                           "--output-root", str(tmp_path / "runs")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.startswith("error: ") and message.count("\n") == 0
    assert f"{root} is not a toy world" in message
    assert "--model-config llava-1.5-7b" in message and "--model-config tiny" in message
    assert not (tmp_path / "runs").exists()                                      # refused before any run folder


def test_the_refusal_yields_to_a_named_preset_a_toy_world_and_a_resumed_run(tmp_path, toy_world):
    root = real_looking_root(tmp_path / "data")
    with pytest.raises(SafeError, match="is not a toy world"):
        parsed("--data-root", root)
    assert parsed("--data-root", root, "--model-config", "tiny").model.preset == "tiny"
    assert parsed("--data-root", root, "--preset", "demo").model.preset == "tiny"
    (tmp_path / "tiny.yaml").write_text("model_config: tiny\n")
    assert parsed("--data-root", root, "--config", tmp_path / "tiny.yaml").model.preset == "tiny"
    assert parsed("--data-root", toy_world).model.preset == "tiny"
    assert parsed("--data-root", root, "--resume", tmp_path / "some_run").train.resume == str(tmp_path / "some_run")
    assert parsed("--data-root", tmp_path / "missing").data.data_root == str(tmp_path / "missing")  # loader's error
