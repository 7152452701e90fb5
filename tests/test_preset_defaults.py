"""Toy defaults belong to the tiny preset, and an unnamed preset follows the data (tiny only on a toy world).

The seed command is checked in its own process; the defaults through the real config builder and argument parser.
"""

import subprocess
import sys
from pathlib import Path

from safe.cli import build_parser
from safe.training.cli import config_from_args
from safe.training.config import build_config

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


def test_an_unnamed_preset_follows_the_data(tmp_path, toy_world):
    """Real data gets LLaVA-1.5-7B and its own defaults, a toy world the tiny model; a named preset always wins."""
    root = real_looking_root(tmp_path / "data")
    real = parsed("--data-root", root)
    assert real.model.preset == "llava-1.5-7b" and (real.train.lr_projector, real.train.max_steps) == (2e-4, None)
    assert parsed("--data-root", root, "--model-config", "tiny").model.preset == "tiny"
    assert parsed("--data-root", root, "--preset", "demo").model.preset == "tiny"
    (tmp_path / "tiny.yaml").write_text("model_config: tiny\n")
    assert parsed("--data-root", root, "--config", tmp_path / "tiny.yaml").model.preset == "tiny"
    assert parsed("--data-root", toy_world).model.preset == "tiny"
    assert parsed("--data-root", root, "--resume", tmp_path / "some_run").model.preset == "tiny"   # its own, later
    assert parsed("--data-root", tmp_path / "missing").model.preset == "tiny"    # the loader says how to stage data


def test_the_seed_command_on_real_data_plans_the_real_model(tmp_path, toy_world):
    """`run_full_training.py --variant soft_retention --data-root DIR`, exactly as the user's README writes it, on
    data that is not a toy world: LLaVA-1.5-7B (here its dry run, offline, from the preset's known architecture)."""
    import shutil

    root = tmp_path / "staged"
    shutil.copytree(toy_world, root)
    (root / "toy_world.json").unlink()                                            # real data, as far as it knows
    done = subprocess.run([sys.executable, "experiments/full_training/run_full_training.py", "--variant",
                           "soft_retention", "--data-root", str(root), "--output-root", str(tmp_path / "runs"),
                           "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model: llava-1.5-7b (the default on real data" in done.stdout
    assert "7.09" in done.stdout or "7,09" in done.stdout                       # frozen parameters of the 7B base
    assert not (tmp_path / "runs").exists()
