"""Evaluation on the splits papers report: `safe train --audio-eval-split test`, `safe eval --split test
[--dataset clotho]`, on the toy world with the tiny preset, through real subprocesses."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from safe.training.cli import config_from_args, configure

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--model-config", "tiny", "--variant", "no_retention", "--max-steps", "2", "--train-batch-size", "4",
         "--val-batch-size", "8", "--num-workers", "0", "--generation-max-new-tokens", "8", "--no-progress",
         "--max-vl-eval-samples", "6"]


def safe_cli(*args):
    return subprocess.run([sys.executable, "-m", "safe", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=900)


def parse(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    configure(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_train_flags_reach_the_config():
    config = parse("--audio-eval-split", "test", "--vl-eval-split", "val", "--audio-eval-dataset", "clotho",
                   "--max-audio-eval-samples", "all", "--max-vl-eval-samples", "40",
                   "--source-weights", "audiocaps=1,clotho=0.25")
    assert (config.data.audio_eval_split, config.data.vl_eval_split, config.data.audio_eval_dataset) == \
        ("test", "val", "clotho")
    assert config.data.max_audio_eval_samples is None and config.data.max_vl_eval_samples == 40
    assert config.data.source_weights == {"audiocaps": 1.0, "clotho": 0.25}
    with pytest.raises(SystemExit):
        parse("--max-audio-eval-samples", "some")
    from safe.core.errors import SafeError

    with pytest.raises(SafeError, match="must be a split name"):
        parse("--audio-eval-split", "../test")


@pytest.fixture(scope="module")
def test_split_run(toy_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    result = safe_cli("train", "--data-root", toy_world, "--output-root", out, *TRAIN, "--audio-eval-split", "test",
                      "--max-audio-eval-samples", "all", "--use-wavcaps",
                      "--source-weights", "audiocaps=1,wavcaps=0.5,clotho=0.3")
    assert result.returncode == 0, result.stderr
    [run] = list(out.iterdir())
    return run


@pytest.mark.slow
def test_eval_on_the_test_split_equals_the_training_time_evaluation(test_split_run):
    run = test_split_run
    metrics = json.loads((run / "metrics.json").read_text())
    trained = metrics["validation"]
    assert trained["audio_samples"] == 8  # the whole AudioCaps test split of the toy world
    result = safe_cli("eval", "--run", run, "--split", "test")
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "eval_audiocaps_test_step_00000002.json").read_text())
    assert written["dataset"] == "audiocaps" and written["split"] == "test"
    assert written["audio_manifest"].endswith("audiocaps_test.jsonl")
    evaluated = written["validation"]
    assert evaluated.keys() == trained.keys()
    timing = {"eval_seconds"}
    assert {k: v for k, v in evaluated.items() if k not in timing} == \
        {k: v for k, v in trained.items() if k not in timing}
    # The realised source mix of the 8 training positions is in metrics.json and the log.
    mix = metrics["training"]["source_mix"]
    assert set(mix) == {"audiocaps", "wavcaps", "clotho"} and sum(s["drawn"] for s in mix.values()) == 8
    assert mix["wavcaps"]["requested"] == pytest.approx(0.5 / 1.8, abs=1e-6)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert any(r["event"] == "source_mix" and "clotho_realised" in r for r in log)


@pytest.mark.slow
def test_eval_on_clotho_and_bad_splits(test_split_run):
    run = test_split_run
    result = safe_cli("eval", "--run", run, "--dataset", "clotho", "--split", "test", "--max-audio-eval-samples",
                      "all", "--max-vl-eval-samples", "4")
    assert result.returncode == 0, result.stderr
    written = json.loads((run / "eval_clotho_test_step_00000002.json").read_text())
    validation = written["validation"]
    assert validation["audio_samples"] == 6 and validation["vl_samples"] == 4 and validation["gate0_exact"] is True
    assert validation["audio_gain"] == pytest.approx(validation["audio_cider"] - validation["audio_cider_muted"])
    missing = safe_cli("eval", "--run", run, "--split", "dev")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "No audiocaps dev manifest" in missing.stderr
