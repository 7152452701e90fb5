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


def torchrun(nproc, config_path, dump, *extra, timeout=900, env=None, check=True):
    torchrun_bin = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run([torchrun_bin, "--standalone", f"--nproc_per_node={nproc}", str(WORKER),
                             str(config_path), str(dump), *map(str, extra)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
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
    recorded = json.loads((run_dir / "metrics.json").read_text())["training"]["schedule_kept"]
    assert recorded["step"] == 2 and recorded["saved"]["total_steps"] == 8 and recorded["world_size"] == 1
    lrs = [r["lr_projector"] for r in log if r["event"] == "train"]
    # Steps 3-8 (the first 2 ran outside the logging loop): the rate falls to 0 at step 8, the end of the 8-step
    # cosine (a 15-step one would still be near its middle).
    assert len(lrs) == 6 and all(later < earlier for earlier, later in zip(lrs, lrs[1:])) and lrs[-1] == 0.0


def test_a_failure_on_another_rank_than_0_is_recorded_in_the_run_folder(toy_world, tmp_path):
    # torchrun stops the other ranks when one fails, so rank 0 cannot say why: the failing rank writes it.
    out, dump = tmp_path / "runs", tmp_path / "dump"
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(values(toy_world, out, variant="no_retention", max_steps=3, save_every=1)))
    failed = torchrun(2, config_path, dump, env={"SAFE_TEST_FAIL": "1:1"}, check=False, timeout=300)
    assert failed.returncode != 0
    run_dir = next(out.iterdir())
    state = json.loads((run_dir / "run_state.rank1.json").read_text())
    assert state["state"] == "failed" and state["step"] == 1
    assert state["error"] == "RuntimeError: injected failure on rank 1"

    # Resumed, the note goes into the log and the file goes: no stale "failed" beside the finished run.
    config_path.write_text(json.dumps(values(toy_world, out, variant="no_retention", max_steps=3, save_every=1,
                                             resume=str(run_dir))))
    torchrun(1, config_path, dump / "resumed")
    assert not list(run_dir.glob("run_state.rank*.json"))
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    (earlier,) = [r for r in log if r["event"] == "earlier_rank_failure"]
    assert earlier["file"] == "run_state.rank1.json" and earlier["error"] == state["error"]


def test_unreadable_samples_on_every_rank_are_counted_and_logged_once(toy_world, tmp_path):
    # One clip of rank 1's first batch (and of no batch of rank 0's) is not audio. 2 ranks x 4 and 1 rank x 8 read
    # the same 24 positions, so the run's count must be the same: rank 1's skip reaches rank 0's metrics and log.
    from safe.training.data import BatchStream

    world = tmp_path / "world"
    shutil.copytree(toy_world, world)
    settings = dict(variant="no_retention", train_batch_size=4)
    config = build_config(cli_values=values(world, tmp_path / "unused", **settings))
    data = load_run_data(config, *audio_settings(config))
    seen = {rank: [] for rank in (0, 1)}
    for rank in (0, 1):  # the trainer's audio stream of each rank (stream 0, the run's seed)
        stream = BatchStream(data.audio_train, 4, config.train.seed, 0, 0, rank=rank, world_size=2,
                             mix=data.source_mix)
        for _ in range(3):
            seen[rank] += stream.next().audio_paths
        stream.close()
    bad = sorted({Path(p).name for p in seen[1][:4]} - {Path(p).name for p in seen[0]})[0]
    (world / "audiocaps" / "audio" / "train" / bad).write_bytes(b"not audio at all")
    counts = {}
    for nproc, batch in ((2, 4), (1, 8)):
        out = tmp_path / f"runs{nproc}"
        config_path = tmp_path / f"config{nproc}.json"
        config_path.write_text(json.dumps(values(world, out, **{**settings, "train_batch_size": batch})))
        torchrun(nproc, config_path, tmp_path / f"dump{nproc}")
        run_dir = next(out.iterdir())
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        skips = [r for r in log if r["event"] == "skipped_sample"]
        counts[nproc] = json.loads((run_dir / "metrics.json").read_text())["training"]["skipped_samples"]
        assert len(skips) == counts[nproc] and all(bad in r["path"] for r in skips), skips
        if nproc == 2:
            assert {r.get("rank") for r in skips} == {1}
    assert counts[2] == counts[1] > 0
