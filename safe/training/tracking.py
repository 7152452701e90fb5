"""Experiment trackers fed from the same records as train_log.jsonl (TensorBoard, Weights & Biases).

Both are optional: TensorBoard is on by default when the package is installed, W&B only with
--wandb-project; a tracker that is missing or fails to start is reported once and training goes on.
"""

from __future__ import annotations

import importlib.util
import numbers
import sys
from pathlib import Path


def _scalars(record: dict) -> dict[str, float]:
    prefix = record.get("event", "log")
    return {f"{prefix}/{key}": float(value) for key, value in record.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and key not in ("step", "time")}


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def __call__(self, record: dict) -> None:
        step = record.get("step")
        if step is None:
            return
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, project: str, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir), config=config,
                              resume="allow", id=Path(run_dir).name)

    def __call__(self, record: dict) -> None:
        step = record.get("step")
        if step is not None:
            self.run.log(_scalars(record), step=int(step))

    def close(self) -> None:
        self.run.finish()


def make_sinks(run_dir: Path, tensorboard: bool | None, wandb_project: str | None, config: dict) -> list:
    sinks: list = []
    want_tb = tensorboard if tensorboard is not None else importlib.util.find_spec("tensorboard") is not None
    if want_tb:
        try:
            sinks.append(TensorBoardSink(run_dir))
        except Exception as exc:  # tensorboard missing or broken: the JSON log still has everything
            print(f"TensorBoard logging is off: {exc}", file=sys.stderr)
    if wandb_project:
        try:
            sinks.append(WandbSink(run_dir, wandb_project, config))
        except Exception as exc:
            print(f"Weights & Biases logging is off ({exc}); install and log in to wandb to use it.",
                  file=sys.stderr)
    return sinks
