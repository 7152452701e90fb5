"""A run can't be lost or silently corrupted: resume is the saved run, nothing is lost at the end, history has no
duplicates, Ctrl-C checkpoints, failures are recorded, and a kill -9 anywhere resumes to the same weights."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from safe.core.errors import SafeError
from safe.training.checkpoint import latest_checkpoint
from safe.training.config import build_config
from safe.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FAST = {"model_config": "tiny", "train_batch_size": 4, "val_batch_size": 8, "num_workers": 0,
        "max_audio_eval_samples": 4, "max_vl_eval_samples": 4, "generation_max_new_tokens": 4, "progress": False}


def config(world, out, **overrides):
    return build_config(cli_values={"data_root": str(world), "output_root": str(out), **FAST, **overrides})


def cli_args(world, out, *extra) -> list[str]:
    args = ["train", "--data-root", str(world), "--output-root", str(out), "--model-config", "tiny",
            "--train-batch-size", "4", "--val-batch-size", "8", "--num-workers", "0", "--max-audio-eval-samples",
            "4", "--max-vl-eval-samples", "4", "--generation-max-new-tokens", "4", "--no-progress"]
    return args + [str(a) for a in extra]


def safe_cli(*args, env=None, timeout=900):
    return subprocess.run([sys.executable, "-m", "safe", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env={**os.environ, **(env or {})})


def interrupted_run(world, out, **settings) -> Path:
    """A run stopped after 2 of its steps with a checkpoint, as a signal would leave it."""
    trainer = Trainer(config(world, out, **settings))
    for _ in range(2):
        trainer.train_step()
    trainer.save()
    trainer._set_state("interrupted", step=2)
    trainer._close()
    return trainer.run_dir


def state(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_state.json").read_text())


def trainable(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(latest_checkpoint(run_dir) / "trainable.safetensors"))


# ------------------------------------------------------------------------------------------- resume


def test_resume_keeps_the_saved_settings_and_refuses_changed_ones(toy_world, tmp_path):
    run_dir = interrupted_run(toy_world, tmp_path, variant="soft_retention", max_steps=4)
    started = json.loads((run_dir / "config.json").read_text())["config"]["train"]["lr_adapter"]
    with pytest.raises(SafeError, match=rf"--lr-adapter is 0\.5 but .* was started with {re.escape(str(started))};"):
        Trainer(config(toy_world, tmp_path, variant="soft_retention", max_steps=4, lr_adapter=0.5, resume=str(run_dir)))
    with pytest.raises(SafeError, match="--variant is 'full_retention'"):
        Trainer(config(toy_world, tmp_path, variant="full_retention", max_steps=4, resume=str(run_dir)))
    with pytest.raises(SafeError, match="--max-steps is 6 .* --override-on-resume max_steps"):
        Trainer(config(toy_world, tmp_path, variant="soft_retention", max_steps=6, resume=str(run_dir)))
    with pytest.raises(SafeError, match="only .* may change"):
        Trainer(config(toy_world, tmp_path, variant="soft_retention", resume=str(run_dir),
                       override_on_resume=["lr_adapter"]))
    # No --data-root at all: the run's own data root, not the default one.
    resumed = Trainer(build_config(cli_values={"resume": str(run_dir), "output_root": str(tmp_path)}))
    assert resumed.config.data.data_root == str(toy_world) and resumed.step == 2
    resumed._close()
    # An allowed change, asked for: applied and logged.
    resumed = Trainer(config(toy_world, tmp_path, variant="soft_retention", max_steps=3, resume=str(run_dir),
                             override_on_resume=["max_steps"]))
    assert resumed.total_steps == 3 and resumed.fit()["status"] == "completed"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["overridden"] for r in log if r["event"] == "resumed"] == [{}, {"max_steps": {"saved": 4, "now": 3}}]


def test_resume_on_another_data_root_needs_the_same_manifests(toy_world, tmp_path):
    run_dir = interrupted_run(toy_world, tmp_path / "runs", variant="no_retention", max_steps=3)
    staged = tmp_path / "scratch_copy"
    shutil.copytree(toy_world, staged)                      # data re-staged elsewhere: same manifests, allowed
    resumed = Trainer(config(staged, tmp_path / "runs", variant="no_retention", max_steps=3, resume=str(run_dir)))
    assert resumed.config.data.data_root == str(staged)
    resumed._close()
    other = tmp_path / "other_world"
    shutil.copytree(toy_world, other)
    manifest = other / "audiocaps" / "audiocaps_train.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))   # one row fewer
    before = state(run_dir)
    with pytest.raises(SafeError, match="does not hold the manifests"):
        Trainer(config(other, tmp_path / "runs", variant="no_retention", max_steps=3, resume=str(run_dir)))
    assert state(run_dir) == before                             # a refused resume leaves the run as it was


def test_resume_auto_finds_a_run_by_its_state_whatever_its_name(toy_world, tmp_path):
    run_dir = interrupted_run(toy_world, tmp_path, variant="no_retention", max_steps=3, run_name="my-experiment")
    resumed = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=3, resume="auto"))
    assert resumed.run_dir == run_dir and resumed.step == 2
    # A second process asking for the same run while the first trains in it: one sentence, no second trainer.
    with pytest.raises(SafeError, match="in use by process"):
        Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=3, resume="auto"))
    resumed._close()


# ----------------------------------------------------------------------------------- end of run


def test_a_bad_validation_row_is_refused_before_training_naming_file_and_line(toy_world, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(toy_world, world)
    manifest = world / "audiocaps" / "audiocaps_val.jsonl"
    rows = manifest.read_text().splitlines()
    bad = json.loads(rows[2])
    bad["captions"] = []
    rows[2] = json.dumps(bad)
    manifest.write_text("\n".join(rows) + "\n")
    result = safe_cli(*cli_args(world, tmp_path / "runs", "--variant", "no_retention", "--max-steps", "2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "audiocaps_val.jsonl:3" in result.stderr and "captions" in result.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert state(run_dir)["state"] == "failed" and "audiocaps_val.jsonl:3" in state(run_dir)["error"]


def test_a_failing_evaluation_keeps_the_final_checkpoint_and_resume_evaluates_it(toy_world, tmp_path, monkeypatch):
    from safe.training.evaluator import Evaluator

    trainer = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=3))

    def broken(self, step):
        raise IndexError("list index out of range")

    monkeypatch.setattr(Evaluator, "run", broken)
    with pytest.raises(SafeError, match=r"evaluation at step 3 failed \(IndexError.*--resume"):
        trainer.fit()
    run_dir = trainer.run_dir
    assert state(run_dir)["state"] == "failed" and "IndexError" in state(run_dir)["error"]
    assert json.loads((latest_checkpoint(run_dir) / "meta.json").read_text())["step"] == 3   # saved first
    monkeypatch.undo()
    resumed = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=3, resume=str(run_dir)))
    result = resumed.fit()
    assert result["status"] == "completed" and state(run_dir) == {"state": "completed", "step": 3}
    assert [h["step"] for h in json.loads((run_dir / "metrics.json").read_text())["history"]] == [3]


def test_resuming_a_completed_run_does_nothing_unless_re_eval(toy_world, tmp_path, capsys):
    trainer = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=2, eval_every=1))
    trainer.fit()
    run_dir = trainer.run_dir
    before = json.loads((run_dir / "metrics.json").read_text())
    again = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=2, eval_every=1,
                           resume=str(run_dir))).fit()
    assert again["status"] == "completed" and "already completed" in capsys.readouterr().out
    assert json.loads((run_dir / "metrics.json").read_text()) == before
    Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=2, eval_every=1, resume=str(run_dir),
                   re_eval=True)).fit()
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, 2]                # re-evaluated in place, not appended


def test_a_run_that_fails_while_loading_its_model_says_failed(toy_world, tmp_path):
    result = safe_cli(*cli_args(toy_world, tmp_path / "runs", "--variant", "no_retention", "--max-steps", "2",
                                "--base-model", tmp_path / "no-such-model"))
    assert result.returncode == 2 and "--base-model" in result.stderr and "Traceback" not in result.stderr
    run_dir = next((tmp_path / "runs").iterdir())
    assert state(run_dir)["state"] == "failed" and "--base-model" in state(run_dir)["error"]


def test_periodic_checkpoints_are_on_by_default(toy_world, tmp_path):
    trainer = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=3, save_every=2))
    assert build_config().train.save_every == 500 and build_config().train.save_every_minutes == 30
    for _ in range(2):
        trainer.train_step()
    trainer._close()
    result = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=3, save_every=2)).fit()
    steps = sorted(json.loads((p / "meta.json").read_text())["step"]
                   for p in (Path(result["run_dir"]) / "checkpoints").glob("step_*"))
    assert steps == [2, 3]                                       # step 2 by the step rule, 3 at the end


# --------------------------------------------------------------------------------------- signals


def test_ctrl_c_checkpoints_and_prints_the_resume_command(toy_world, tmp_path):
    out = tmp_path / "runs"
    args = cli_args(toy_world, out, "--variant", "no_retention", "--max-steps", 400, "--log-every", 1)
    process = subprocess.Popen([sys.executable, "-m", "safe", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not [p for p in out.glob("*/train_log.jsonl") if '"train"' in p.read_text()]:
        time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=600)
    run_dir = next(out.iterdir())
    assert process.returncode == 0, output
    assert state(run_dir)["state"] == "interrupted" and latest_checkpoint(run_dir) is not None
    assert f"safe train --resume {run_dir}" in output


# --------------------------------------------------------------------------------------- crashes


FAULT_SETTINGS = ["--variant", "full_retention", "--max-steps", 4, "--eval-every", 2, "--save-every", 3,
                  "--fisher-refresh", 2, "--fisher-samples", 2, "--null-space-refresh", 3, "--null-space-samples", 8,
                  "--protect-from-gate", 0, "--seed", 3]


def test_kill_9_anywhere_then_resume_gives_the_uninterrupted_weights_and_history(toy_world, tmp_path):
    """SIGKILL while the model loads, after a step, inside an evaluation, between a metrics write and the next
    checkpoint, and in the middle of a checkpoint write; each run resumed until done must end with the weights
    (bit for bit, CPU) and the evaluation history of a run never interrupted."""
    straight = safe_cli(*cli_args(toy_world, tmp_path / "straight", *FAULT_SETTINGS))
    assert straight.returncode == 0, straight.stderr
    expected_dir = next((tmp_path / "straight").iterdir())
    expected = trainable(expected_dir)
    expected_history = json.loads((expected_dir / "metrics.json").read_text())["history"]
    assert [h["step"] for h in expected_history] == [2, 4]
    # Checkpoints at 2 (before its evaluation), 3 (every 3 steps) and 4 (the end, before the final evaluation).
    # The five points are independent runs, two at a time (each is one thread: the tiny preset).
    points = ("model:1", "step:3", "eval:1", "metrics:1", "checkpoint:2")
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = dict(zip(points, pool.map(lambda point: kill_then_resume(toy_world, tmp_path, point), points)))
    for point, (killed, first_resume, resumed, run_dir) in outcomes.items():
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-2000:])
        if point == "model:1":                                   # no checkpoint yet: nothing to resume
            assert first_resume.returncode == 2 and "holds no checkpoint" in first_resume.stderr
        assert resumed.returncode == 0, (point, resumed.stderr[-2000:])
        assert state(run_dir) == {"state": "completed", "step": 4}, point
        got = trainable(run_dir)
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), (point, name)
        history = json.loads((run_dir / "metrics.json").read_text())["history"]
        assert [h["step"] for h in history] == [2, 4], point
        for mine, theirs in zip(history, expected_history):
            assert {k: v for k, v in mine.items() if k != "eval_seconds"} == \
                {k: v for k, v in theirs.items() if k != "eval_seconds"}, point


def kill_then_resume(world, tmp_path, point):
    """A run killed (SIGKILL) at ``point``, then resumed until done; a run killed before its first checkpoint is
    started again instead."""
    out = tmp_path / point.replace(":", "_")
    killed = safe_cli(*cli_args(world, out, *FAULT_SETTINGS), env={"SAFE_FAULT_AT": point})
    run_dir = next(out.iterdir())
    first_resume = resumed = safe_cli(*cli_args(world, out, *FAULT_SETTINGS, "--resume", run_dir))
    if point == "model:1":                                   # no checkpoint to resume: start again
        resumed = safe_cli(*cli_args(world, out, *FAULT_SETTINGS))
        run_dir = max(out.iterdir(), key=lambda p: p.stat().st_mtime)
    return killed, first_resume, resumed, run_dir
