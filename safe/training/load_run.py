"""A run folder's model: its config.json, its latest (or a named) checkpoint, and the model with that state loaded.

`safe eval` and the Python API (safe.inference) both start here."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safe.core.errors import SafeError
from safe.training.checkpoint import latest_checkpoint
from safe.training.config import RunConfig


def run_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> tuple[RunConfig, Path]:
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise SafeError(f"{run_dir} is not a run folder (no config.json); pass a folder made by `safe train`.")
    config = RunConfig.from_dict(json.loads(config_path.read_text())["config"]).validate()
    path = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if path is None or not path.is_dir():
        raise SafeError(f"{run_dir} has no checkpoint yet; train it (or --resume it) until it saves one.")
    return config, path


def load_run_model(run_dir: str | Path, checkpoint: str | None = None, device: str | None = None):
    """The run's base model (as named in its config.json) with the run's trainable state loaded."""
    from safe.training.model_factory import build_model

    config, path = run_checkpoint(run_dir, checkpoint)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_model(config, target)
    model.load_trainable(path)
    model.eval()
    return model, config
