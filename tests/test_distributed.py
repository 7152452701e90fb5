"""torchrun with 2 CPU processes (gloo) on the toy world: identical to one process, world-size independent."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open

from safe.training.config import build_config
from safe.training.data import load_run_data
from safe.training.evaluator import Evaluator
from safe.training.model_factory import audio_settings, build_model

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "helpers" / "dist_worker.py"

pytestmark = pytest.mark.slow


def torchrun(nproc, config_path, dump, *extra, timeout=900):
    torchrun_bin = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([torchrun_bin, "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
                             str(config_path), str(dump), *map(str, extra)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def values(toy_world, out, **overrides):
    return {"data_root": str(toy_world), "output_root": str(out), "model_config": "tiny", "variant": "soft_retention",
            "train_batch_size": 4, "val_batch_size": 8, "num_workers": 0, "max_audio_eval_samples": 6,
            "max_vl_eval_samples": 6, "generation_max_new_tokens": 8, "progress": False, "max_steps": 3,
            **overrides}


def test_two_processes_train_identically_and_evaluate_like_one(toy_world, tmp_path):
    out, dump = tmp_path / "runs", tmp_path / "dump"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(values(toy_world, out)))
    torchrun(2, config_path, dump)

    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    runs = list(out.iterdir())
    assert len(runs) == 1  # rank 0 alone writes outputs
    run_dir = runs[0]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 2 and metrics["training"]["global_batch_size"] == 8
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "global_batch_size": 8}

    # A single-process evaluation of the saved checkpoint gives the same metrics.
    run_config = build_config(cli_values=values(toy_world, out))
    model = build_model(run_config, torch.device("cpu"))
    model.load_trainable(run_dir / "checkpoints" / "step_00000003")
    data = load_run_data(run_config, *audio_settings(run_config))
    single = Evaluator.for_run(model, data, run_config, None, torch.device("cpu")).run(step=3)
    distributed = metrics["validation"]
    for key, value in single.items():
        if key != "eval_seconds":
            assert distributed[key] == value, key


def test_resume_a_two_process_checkpoint_with_one_process(toy_world, tmp_path):
    out, dump = tmp_path / "runs", tmp_path / "dump"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(values(toy_world, out, max_steps=4)))
    torchrun(2, config_path, dump, 2)  # stop after 2 of 4 steps
    run_dir = next(out.iterdir())
    assert json.loads((run_dir / "run_state.json").read_text())["state"] == "interrupted"
    with safe_open(str(dump / "rank0.safetensors"), "pt") as handle:
        assert handle.metadata()["step"] == "2"

    config_path.write_text(json.dumps(values(toy_world, out, max_steps=4, resume=str(run_dir))))
    torchrun(1, config_path, dump / "resumed")
    assert [p.name for p in out.iterdir()] == [run_dir.name]
    state = json.loads((run_dir / "run_state.json").read_text())
    assert state == {"state": "completed", "step": 4}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["world_size"] == 1 and metrics["validation"]["gate0_exact"] is True
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "resumed" and r["step"] == 2 for r in log)


def test_a_run_resumed_on_fewer_processes_keeps_its_learning_rate_schedule(toy_world, tmp_path):
    # With --num-epochs the step count follows the global batch: 120 clips in batches of 8 on 2 ranks is 8 steps,
    # on 1 rank 15. The resumed run keeps its 8-step cosine instead of climbing back up a 15-step one.
    out, dump = tmp_path / "runs", tmp_path / "dump"
    config_path = tmp_path / "config.json"
    settings = dict(variant="no_retention", num_epochs=1, max_steps=None, train_batch_size=8, log_every=1)
    config_path.write_text(json.dumps(values(toy_world, out, **settings)))
    torchrun(2, config_path, dump, 2)  # stop after 2 of 8 steps
    run_dir = next(out.iterdir())
    config_path.write_text(json.dumps(values(toy_world, out, **settings, resume=str(run_dir))))
    resumed = torchrun(1, config_path, dump / "resumed")
    assert "keeping the run's schedule (8 steps" in resumed.stdout
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    (kept,) = [r for r in log if r["event"] == "schedule_kept"]
    assert kept["saved"]["total_steps"] == 8 and kept["recomputed"]["total_steps"] == 15
    assert json.loads((run_dir / "run_state.json").read_text()) == {"state": "completed", "step": 8}
    lrs = [r["lr_projector"] for r in log if r["event"] == "train"]
    assert len(lrs) == 8 and all(later <= earlier for earlier, later in zip(lrs, lrs[1:]))  # past warm-up: down
