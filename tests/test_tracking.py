"""Trackers are optional: absent packages never break a run, and sinks see what the JSON log sees."""

import builtins
import json

from safe.training.outputs import RunLogger
from safe.training.tracking import make_sinks


def test_missing_wandb_and_tensorboard_do_not_break_logging(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_trackers(name, *args, **kwargs):
        if name.split(".")[0] in ("wandb", "tensorboard") or name == "torch.utils.tensorboard":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trackers)
    sinks = make_sinks(tmp_path, tensorboard=True, wandb_project="my-project", config={})
    assert sinks == []
    err = capsys.readouterr().err
    assert "TensorBoard logging is off" in err and "Weights & Biases logging is off" in err
    logger = RunLogger(tmp_path, sinks=sinks)
    logger.log({"event": "train", "step": 1, "caption_loss": 2.5})
    logger.close()
    record = json.loads((tmp_path / "train_log.jsonl").read_text())
    assert record["caption_loss"] == 2.5


def test_sinks_receive_the_same_records_as_the_log(tmp_path):
    seen = []
    logger = RunLogger(tmp_path, sinks=[seen.append])
    logger.log({"event": "eval", "step": 3, "audio_cider": 12.5, "bad": float("nan")})
    on_disk = json.loads((tmp_path / "train_log.jsonl").read_text())
    assert seen == [on_disk] and on_disk["bad"] is None
