"""Checkpoint integrity: `latest.json` is only followed to a complete folder of its own run (a corrupt, foreign or
dangling pointer falls back to the newest complete checkpoint with a warning); replacing a checkpoint never leaves
the pointer naming nothing; a trainer_state.pt that would run code is refused in one sentence; everything a run
writes gets one file mode. Real checkpoints of a real (tiny) SAFE model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_model import tiny_safe_model, trainer_state

from safe.core.errors import SafeError
from safe.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return tiny_safe_model()


@pytest.fixture(scope="module")
def state(model):
    return trainer_state(model)


def is_complete(folder: Path) -> bool:
    names = ("trainable.safetensors", "safe_config.json", "trainer_state.pt", "meta.json")
    return all((folder / name).is_file() for name in names)


def pointer(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "latest.json"


def make_run(root: Path, name: str, steps, model, state) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"train": {"variant": "soft_retention"}}}))
    for step in steps:
        save_checkpoint(run, step, model, {**state, "step": step}, {"variant": "soft_retention"})
    return run


@pytest.mark.parametrize("named", ["../../b_soft_retention/checkpoints/step_00000005", "ABSOLUTE", "SYMLINK"])
def test_a_pointer_to_another_runs_checkpoint_is_not_followed(tmp_path, model, state, capsys, named):
    mine = make_run(tmp_path, "a_soft_retention", [1, 2], model, state)
    other = make_run(tmp_path, "b_soft_retention", [5], model, state)
    if named == "ABSOLUTE":
        named = str(other / "checkpoints" / "step_00000005")
    elif named == "SYMLINK":  # a link inside this run's checkpoints/ that leads to the other run
        os.symlink(other / "checkpoints" / "step_00000005", mine / "checkpoints" / "step_00000009")
        named = "step_00000009"
    pointer(mine).write_text(json.dumps({"path": named, "step": 5}))
    # `safe eval --run a` and a resume of a would otherwise read b's weights.
    assert latest_checkpoint(mine) == mine / "checkpoints" / "step_00000002"
    warning = capsys.readouterr().err
    assert str(pointer(mine)) in warning and "step_00000002" in warning
    assert "not a checkpoint folder of this run" in warning or "leads outside this run" in warning


def test_a_corrupt_pointer_falls_back_and_does_not_block_resume_auto(tmp_path, model, state, capsys):
    from safe.training.config import build_config
    from safe.training.trainer import resolve_run_dir

    older = make_run(tmp_path, "20250101_000000_soft_retention", [3], model, state)
    newer = make_run(tmp_path, "20250102_000000_soft_retention", [1, 2], model, state)
    pointer(newer).write_bytes(b"\x00\xff{garbage")
    assert latest_checkpoint(newer) == newer / "checkpoints" / "step_00000002"
    assert "is not a valid checkpoint pointer" in capsys.readouterr().err
    config = build_config(cli_values={"output_root": str(tmp_path), "variant": "soft_retention", "resume": "auto"})
    assert resolve_run_dir(config) == (newer, True)
    assert latest_checkpoint(older) == older / "checkpoints" / "step_00000003"


def test_a_pointer_to_a_missing_folder_falls_back_to_the_newest_complete_one(tmp_path, model, state, capsys):
    run = make_run(tmp_path, "run", [1, 2], model, state)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000001"
    assert "missing or incomplete" in capsys.readouterr().err
    (run / "checkpoints" / "step_00000001" / "trainer_state.pt").unlink()  # no complete checkpoint is left
    assert latest_checkpoint(run) is None
    assert "holds no complete checkpoint" in capsys.readouterr().err


def test_replacing_a_checkpoint_never_leaves_the_pointer_naming_nothing(tmp_path, model, state, monkeypatch):
    """After every rename and every deletion inside save_checkpoint, latest.json names a complete folder."""
    run = make_run(tmp_path, "run", [3, 4], model, state)
    checks = []

    def check_pointer():
        named = pointer(run).parent / json.loads(pointer(run).read_text())["path"]
        checks.append(named.name)
        assert is_complete(named), f"latest.json names {named.name}, which is not a complete checkpoint"

    def watched(original):
        def call(*args, **kwargs):
            result = original(*args, **kwargs)
            check_pointer()
            return result
        return call

    monkeypatch.setattr(shutil, "rmtree", watched(shutil.rmtree))
    monkeypatch.setattr(os, "replace", watched(os.replace))
    monkeypatch.setattr(Path, "rename", watched(Path.rename))
    for round_ in range(3):  # the same step again and again (a signal at an evaluation step, a resumed end)
        save_checkpoint(run, 4, model, {**state, "step": 4, "round": round_}, {"round": round_})
        newest = latest_checkpoint(run)
        assert json.loads((newest / "meta.json").read_text())["round"] == round_
        assert load_checkpoint(newest, model)["round"] == round_
    assert len(checks) > 10
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_00000003", newest.name]


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_trainer_state_that_would_run_code_is_refused_in_one_sentence(tmp_path, model, state):
    run = make_run(tmp_path, "run", [1], model, state)
    folder = latest_checkpoint(run)
    marker = tmp_path / "code_ran"
    torch.save({**state, "payload": RunsCode(marker)}, folder / "trainer_state.pt")
    with pytest.raises(SafeError) as caught:
        load_checkpoint(folder, model)
    message = str(caught.value)
    assert str(folder / "trainer_state.pt") in message and "not loaded" in message
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()


def test_a_damaged_trainer_state_is_one_sentence(tmp_path, model, state):
    run = make_run(tmp_path, "run", [1], model, state)
    state_file = latest_checkpoint(run) / "trainer_state.pt"
    state_file.write_bytes(state_file.read_bytes()[:1000])
    with pytest.raises(SafeError, match="is damaged or truncated"):
        load_checkpoint(state_file.parent, model)


MODES = """
import os, sys, torch
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers.tiny_model import tiny_safe_model, trainer_state
from safe.data.feature_cache import FeatureCache
from safe.data.manifest import write_jsonl
from safe.training.checkpoint import save_checkpoint
from safe.training.outputs import RunLogger, write_json_atomic

model = tiny_safe_model()
state = trainer_state(model)
for mask, name in ((0o022, "u022"), (0o027, "u027")):
    os.umask(mask)
    run = Path(sys.argv[1]) / name
    save_checkpoint(run, 1, model, state, {{}})
    write_json_atomic(run / "metrics.json", {{"validation": {{}}}})
    write_json_atomic(run / "config.json", {{"config": {{}}}})
    RunLogger(run).log({{"event": "train", "step": 1}})
    write_jsonl(run / "data" / "m.jsonl", [{{"id": 1}}])
    FeatureCache(run / "cache", "enc", 16000, 1.0).put(run / "metrics.json", 0, torch.ones(2, 3))  # any file as a clip
"""


def test_everything_a_run_writes_has_one_file_mode_honouring_the_umask(tmp_path):
    done = subprocess.run([sys.executable, "-c", MODES.format(tests=str(REPO / "tests")), str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    for name, file_mode, dir_mode in (("u022", 0o644, 0o755), ("u027", 0o640, 0o750)):
        run = tmp_path / name
        files = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_file()}
        dirs = {str(p.relative_to(run)): p.stat().st_mode & 0o777 for p in run.rglob("*") if p.is_dir()}
        assert {"metrics.json", "config.json", "train_log.jsonl", "checkpoints/latest.json",
                "checkpoints/step_00000001/trainable.safetensors", "checkpoints/step_00000001/trainer_state.pt",
                "checkpoints/step_00000001/meta.json", "data/m.jsonl"} <= set(files)
        assert any(path.endswith(".shard") and path.startswith("cache/") for path in files)  # feature shards
        assert {path: mode for path, mode in files.items() if mode != file_mode} == {}, name
        assert {path: mode for path, mode in dirs.items() if mode != dir_mode} == {}, name
