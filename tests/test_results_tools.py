"""Using results: `safe caption`/`ask`/`eval`, `safe report`, and TensorBoard files (issue: using the results)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from safe.eval.captions import caption_metrics
from safe.training.config import build_config
from safe.training.report import COLUMNS, find_runs
from safe.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def safe_cli(*args):
    return subprocess.run([sys.executable, "-m", "safe", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=900)


@pytest.fixture(scope="module")
def two_runs(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    runs = []
    for variant in ("no_retention", "soft_retention"):
        config = build_config(cli_values={
            "data_root": str(toy_world), "output_root": str(out), "variant": variant, "model_config": "tiny",
            "max_steps": 150, "train_batch_size": 8, "val_batch_size": 16, "num_workers": 0,
            "lr_projector": 2e-3, "lr_adapter": 2e-3, "max_audio_eval_samples": 16, "max_vl_eval_samples": 8,
            "generation_max_new_tokens": 12, "progress": False, "eval_every": 75, "log_every": 5,
            "tensorboard": True})
        runs.append(Path(Trainer(config).fit()["run_dir"]))
    return out, runs


def test_caption_command_beats_the_muted_model(two_runs, toy_world):
    _, runs = two_runs
    rows = [json.loads(line) for line in (toy_world / "audiocaps" / "audiocaps_val.jsonl").read_text().splitlines()]
    files = [toy_world / "audiocaps" / row["audio_path"] for row in rows]
    refs = [row["captions"] for row in rows]
    with_audio = safe_cli("caption", "--run", runs[0], "--audio", *files)
    muted = safe_cli("caption", "--run", runs[0], "--gate", "0", "--audio", *files)
    assert with_audio.returncode == 0, with_audio.stderr
    captions = [line.split("\t", 1)[1] for line in with_audio.stdout.strip().splitlines()]
    muted_captions = [line.split("\t", 1)[1] for line in muted.stdout.strip().splitlines()]
    assert len(captions) == len(files) == len(muted_captions)
    assert len(set(muted_captions)) == 1  # without audio every clip gets the same caption
    scored = caption_metrics(captions, refs, cider_only=True)["cider"]
    assert scored > caption_metrics(muted_captions, refs, cider_only=True)["cider"]


def test_ask_and_eval_commands(two_runs, toy_world):
    _, runs = two_runs
    row = json.loads((toy_world / "vqa" / "vqa_val.jsonl").read_text().splitlines()[0])
    image = toy_world / "vqa" / row["image_path"]
    base = safe_cli("ask", "--run", runs[1], "--image", image, "--question", row["question"], "--gate", "0")
    plain = safe_cli("ask", "--run", runs[1], "--image", image, "--question", row["question"])
    assert base.returncode == 0 and plain.returncode == 0, base.stderr
    assert base.stdout.strip() == plain.stdout.strip()  # no audio: the SAFE model is the base model
    evaluated = safe_cli("eval", "--run", runs[1], "--max-audio-eval-samples", 4, "--max-vl-eval-samples", 4)
    assert evaluated.returncode == 0, evaluated.stderr
    written = json.loads(next(runs[1].glob("eval_audiocaps_val_step_*.json")).read_text())
    assert written["validation"]["gate0_exact"] is True and written["validation"]["audio_samples"] == 4


def test_eval_reads_the_feature_cache_training_filled(two_runs, monkeypatch):
    from safe.cli import main
    from safe.models.audio_encoders import TinyConvEncoder

    _, runs = two_runs
    calls = []
    original = TinyConvEncoder._encode

    def counting(self, waveforms):
        calls.append(waveforms.shape[0])
        return original(self, waveforms)

    monkeypatch.setattr(TinyConvEncoder, "_encode", counting)
    assert main(["eval", "--run", str(runs[1]), "--max-audio-eval-samples", "4", "--max-vl-eval-samples", "4"]) == 0
    assert calls == []  # the val clips and distractors were encoded, and cached, while the run trained


def test_commands_on_a_run_without_checkpoint_say_so(tmp_path):
    run = tmp_path / "20260101_000000_soft_retention"
    run.mkdir()
    result = safe_cli("caption", "--run", run, "--audio", "x.wav")
    assert result.returncode == 2 and "not a run folder" in result.stderr and "Traceback" not in result.stderr
    (run / "config.json").write_text(json.dumps({"config": build_config().to_dict()}))
    result = safe_cli("caption", "--run", run, "--audio", "x.wav")
    assert result.returncode == 2 and "has no checkpoint yet" in result.stderr


def test_report_table_equals_the_runs_metrics(two_runs, tmp_path):
    out, runs = two_runs
    result = safe_cli("report", out, "--out", tmp_path / "report")
    assert result.returncode == 0, result.stderr
    assert find_runs([out]) == sorted(runs)
    with open(tmp_path / "report" / "comparison.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["variant"] for row in table] == ["no_retention", "soft_retention"]
    for row, run in zip(table, sorted(runs)):
        metrics = json.loads((run / "metrics.json").read_text())
        for column, source, key, _ in COLUMNS:
            if source is None:
                assert row[column] == run.name
                continue
            value = metrics[source][key]
            assert row[column] == ("" if value is None else str(value)), column
    markdown = (tmp_path / "report" / "comparison.md").read_text()
    for run, variant in zip(sorted(runs), ("no_retention", "soft_retention")):
        assert f"| {run.name} | {variant} |" in markdown
    for name in ("comparison.png", "learning_curves.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000


def test_tensorboard_holds_the_logged_scalars(two_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, runs = two_runs
    events = EventAccumulator(str(runs[1] / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/caption_loss", "train/kl_loss", "eval/audio_cider", "eval/vl_base_accuracy"} <= tags
    log = [json.loads(line) for line in (runs[1] / "train_log.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["caption_loss"] for r in log if r["event"] == "train"}
    written = {e.step: e.value for e in events.Scalars("train/caption_loss")}
    assert written.keys() == logged.keys()
    for step, value in logged.items():
        assert written[step] == pytest.approx(value, rel=1e-6)
