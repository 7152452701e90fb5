"""End-to-end Stage A on the small toy world with the tiny preset: training, retention, run outputs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safe.training.config import build_config
from safe.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

FAST = {"model_config": "tiny", "train_batch_size": 4, "val_batch_size": 8, "num_workers": 0,
        "max_audio_eval_samples": 6, "max_vl_eval_samples": 6, "generation_max_new_tokens": 8, "progress": False}

VALIDATION_KEYS = [
    "audio_bleu_1", "audio_bleu_2", "audio_bleu_3", "audio_bleu_4", "audio_meteor", "audio_rouge_l", "audio_cider",
    "audio_spice", "audio_spider", "audio_cider_muted", "audio_gain", "audio_samples", "vl_base_accuracy",
    "vl_safe_accuracy", "vl_safe_distractor_accuracy", "vl_delta", "vl_distractor_delta", "vl_samples",
    "gate0_exact",
]


def config(toy_world, out, **overrides):
    return build_config(cli_values={"data_root": str(toy_world), "output_root": str(out), **FAST, **overrides})


def safe_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "safe", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=900, **kwargs)


@pytest.fixture(scope="module")
def finished_run(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = Trainer(config(toy_world, out, variant="full_retention", max_steps=4, eval_every=2,
                            fisher_refresh=2, null_space_refresh=2, fisher_samples=4, null_space_samples=8,
                            protect_from_gate=0.0)).fit()
    return Path(result["run_dir"]), result


def test_run_directory_has_every_output(finished_run):
    run_dir, result = finished_run
    assert result["status"] == "completed" and result["step"] == 4
    assert run_dir.name.endswith("_full_retention")
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["train"]["variant"] == "full_retention"
    assert saved["config"]["retention"]["fisher_weight"] > 0 and saved["config"]["retention"]["null_space_rank"] > 0
    assert saved["environment"]["packages"]["torch"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    validation = metrics["validation"]
    for key in VALIDATION_KEYS:
        assert key in validation, key
    assert validation["gate0_exact"] is True
    assert validation["audio_samples"] == 6 and validation["vl_samples"] == 6
    assert validation["vl_delta"] == pytest.approx(validation["vl_safe_accuracy"] - validation["vl_base_accuracy"])
    assert validation["audio_gain"] == pytest.approx(validation["audio_cider"] - validation["audio_cider_muted"])
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    assert metrics["training"]["step"] == 4 and metrics["training"]["status"] == "completed"
    assert metrics["throughput"]["samples_per_second"] > 0
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    events = {r["event"] for r in log}
    assert {"train", "eval", "fisher_refresh", "null_space_refresh"} <= events
    assert (run_dir / "predictions" / "step_00000004" / "captions.jsonl").is_file()
    vqa_file = run_dir / "predictions" / "step_00000004" / "vqa.jsonl"
    vqa = [json.loads(line) for line in vqa_file.read_text().splitlines()]
    assert len(vqa) == 6 and all(len(r["answers"]) == 10 for r in vqa)
    for png in ("loss.png", "metrics.png"):
        assert (run_dir / "plots" / png).stat().st_size > 1000
    assert json.loads((run_dir / "run_state.json").read_text())["state"] == "completed"


def test_checkpoint_holds_trainable_state_only(finished_run):
    run_dir, _ = finished_run
    from safetensors.torch import load_file

    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert checkpoints and checkpoints[-1].name == "step_00000004"
    tensors = load_file(str(checkpoints[-1] / "trainable.safetensors"))
    assert tensors and all(name.startswith(("projector.", "fusion.")) for name in tensors)
    assert sum(t.numel() for t in tensors.values()) < 1_000_000  # no frozen base weights in there


def _weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_trainable_parameters().items()}


def test_resume_is_bit_identical_to_an_uninterrupted_run(toy_world, tmp_path):
    # protect_from_gate 0: the Fisher and the null space start at once, so their state goes through the checkpoint
    settings = dict(variant="full_retention", max_steps=5, fisher_refresh=2, null_space_refresh=3, fisher_samples=4,
                    null_space_samples=8, protect_from_gate=0.0)
    straight = Trainer(config(toy_world, tmp_path / "a", **settings))
    straight.fit()
    expected = _weights(straight)

    first = Trainer(config(toy_world, tmp_path / "b", **settings))
    for _ in range(3):
        first.train_step()
    first.save()
    first._set_state("interrupted")
    first._close()  # what the process's exit does: its run lock goes
    resumed = Trainer(config(toy_world, tmp_path / "b", resume=str(first.run_dir), **settings))
    assert resumed.step == 3
    resumed.fit()
    got = _weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_sigterm_checkpoints_and_resume_finishes(toy_world, tmp_path):
    out = tmp_path / "runs"
    args = ["train", "--data-root", str(toy_world), "--output-root", str(out), "--variant", "soft_retention",
            "--max-steps", "400", "--model-config", "tiny", "--train-batch-size", "4", "--num-workers", "0",
            "--max-audio-eval-samples", "4", "--max-vl-eval-samples", "4", "--val-batch-size", "8",
            "--generation-max-new-tokens", "8", "--no-progress", "--log-every", "1"]
    process = subprocess.Popen([sys.executable, "-m", "safe", *args], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    logs = []
    while time.time() < deadline and not logs:  # wait for the first logged optimizer step
        logs = [p for p in out.glob("*/train_log.jsonl") if '"event": "train"' in p.read_text()]
        time.sleep(0.5)
    assert logs, "training never started"
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    run_dir = logs[0].parent
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state["state"] == "interrupted" and 0 < state["step"] < 400
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["status"] == "interrupted"
    assert (run_dir / "checkpoints" / "latest.json").is_file()
    resumed = safe_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in out.iterdir()) == [run_dir.name]  # the same folder, not a new run
    events = [json.loads(line)["event"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert "resumed" in events
    assert json.loads((run_dir / "run_state.json").read_text()) == {"state": "completed", "step": 400}


def test_a_stop_asked_for_before_an_evaluation_step_defers_the_evaluation_to_the_resumed_run(toy_world, tmp_path):
    # SLURM's USR1 comes a few minutes before the time limit; an evaluation started after it (minutes at 7B) could
    # be killed half-way. The run checkpoints and stops; the resumed run evaluates that step first.
    settings = dict(variant="no_retention", max_steps=4, eval_every=2, log_every=1)
    first = Trainer(config(toy_world, tmp_path, **settings))
    real_step = first.train_step

    def step_then_stop():
        record = real_step()
        if first.step == 2:  # the signal arrives during the step that ends on an evaluation step
            signal.raise_signal(signal.SIGTERM)
        return record

    first.train_step = step_then_stop
    assert first.fit()["status"] == "interrupted"
    run_dir = first.run_dir
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert not [r for r in log if r["event"] == "eval"]
    assert json.loads((run_dir / "run_state.json").read_text()) == {"state": "interrupted", "step": 2}
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()

    resumed = Trainer(config(toy_world, tmp_path, resume=str(run_dir), **settings))
    assert resumed.fit()["status"] == "completed"
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    events = [(r["event"], r.get("step")) for r in log if r["event"] in ("resumed", "eval", "train")]
    after = events[events.index(("resumed", 2)):]
    assert after[:3] == [("resumed", 2), ("eval", 2), ("train", 3)]
    assert [step for event, step in events if event == "eval"] == [2, 4]


def test_user_mistakes_are_one_sentence(toy_world, tmp_path):
    result = safe_cli("train", "--variant", "best_retention", "--data-root", str(toy_world))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "Unknown variant 'best_retention'; choose one of: no_retention, soft_retention" in result.stderr
    result = safe_cli("train", "--data-root", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "does not exist" in result.stderr and "make demo" in result.stderr
    empty = tmp_path / "empty_root"
    (empty / "audiocaps").mkdir(parents=True)
    (empty / "audiocaps" / "audiocaps_train.jsonl").write_text("")
    (empty / "audiocaps" / "audiocaps_val.jsonl").write_text("")  # the held-out split is opened first
    result = safe_cli("train", "--data-root", str(empty), "--model-config", "tiny")
    assert result.returncode == 2 and "split is empty" in result.stderr and "Traceback" not in result.stderr


def test_non_finite_losses_stop_the_run_with_a_clear_error(toy_world, tmp_path):
    trainer = Trainer(config(toy_world, tmp_path, variant="no_retention", max_steps=20,
                             max_consecutive_nonfinite=3))
    with torch.no_grad():
        for param in trainer.model.projector.parameters():
            param.fill_(float("nan"))
    from safe.core.errors import SafeError

    with pytest.raises(SafeError, match="3 optimizer steps in a row had a non-finite loss"):
        trainer.fit()
    assert trainer.counters["nonfinite_skipped_steps"] == 3


def test_metrics_json_survives_a_kill_mid_run(toy_world, tmp_path):
    out = tmp_path / "runs"
    args = ["train", "--data-root", str(toy_world), "--output-root", str(out), "--variant", "no_retention",
            "--max-steps", "400", "--eval-every", "1", "--model-config", "tiny", "--train-batch-size", "4",
            "--num-workers", "0", "--max-audio-eval-samples", "4", "--max-vl-eval-samples", "4",
            "--val-batch-size", "8", "--generation-max-new-tokens", "8", "--no-progress"]
    process = subprocess.Popen([sys.executable, "-m", "safe", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and not list(out.glob("*/metrics.json")):
        time.sleep(0.2)
    time.sleep(1.0)  # let it get into the next steps (and possibly the middle of another write)
    process.kill()
    process.wait(timeout=60)
    metrics_path = next(out.glob("*/metrics.json"))
    metrics = json.loads(metrics_path.read_text())  # the last good state, never a torn file
    assert metrics["history"] and metrics["training"]["status"] == "running"
    assert metrics["validation"]["gate0_exact"] is True


def test_activation_checkpointing_trains_bit_identically(toy_world, tmp_path):
    """Soft retention (student, teacher and KL) with LoRA, with and without activation checkpointing."""
    runs = {}
    for on in (False, True):
        trainer = Trainer(config(toy_world, tmp_path / str(on), variant="soft_retention", max_steps=3, lora_rank=2,
                                 seed=4, activation_checkpointing=on))
        for _ in range(3):
            trainer.train_step()
        runs[on] = _weights(trainer)
    assert all(torch.equal(runs[False][n], runs[True][n]) for n in runs[False])
