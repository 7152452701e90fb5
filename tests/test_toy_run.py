"""A quick toy run shows learning with no tuning: `safe train` on the toy world with the tiny preset's own defaults
(the demo's learning rates), its end-of-run summary, `safe eval` as a table or JSON; nothing but SAFE's output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def safe_cli(*args):
    return subprocess.run([sys.executable, "-m", "safe", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=900)


def test_a_short_toy_run_learns_with_the_tiny_defaults_and_reports_plainly(toy_world, tmp_path):
    args = ["train", "--data-root", toy_world, "--output-root", tmp_path, "--variant", "no_retention",
            "--max-steps", "250", "--max-audio-eval-samples", "16", "--max-vl-eval-samples", "16",
            "--num-workers", "0", "--no-progress"]
    done = safe_cli(*args)
    assert done.returncode == 0, done.stderr
    assert "tiny preset defaults: --lr-projector 0.002 --lr-adapter 0.002 (set any of them" in done.stdout
    assert "Loading weights" not in done.stderr and "Writing model shards" not in done.stderr, done.stderr
    run = next(tmp_path.glob("*_no_retention"))
    recorded = json.loads((run / "config.json").read_text())
    assert (recorded["config"]["train"]["lr_projector"], recorded["config"]["train"]["lr_adapter"]) == (2e-3, 2e-3)
    assert recorded["config"]["train"]["max_steps"] == 250
    assert recorded["environment"]["command"] == "python -m safe " + " ".join(map(str, args))
    validation = json.loads((run / "metrics.json").read_text())["validation"]
    # a few hundred steps (seconds) already listen
    assert validation["audio_gain"] > 10 and validation["audio_listen_gain"] > 5
    summary = done.stdout.splitlines()[-3:]
    assert summary[0].startswith(f"captions (16 clips): CIDEr-D {validation['audio_cider']:.2f}, base without audio")
    assert summary[1].startswith(f"VQA (16 questions): base {validation['vl_base_accuracy']:.2f}")
    assert summary[2] == "gate 0 is the base, bit for bit: yes"

    table = safe_cli("eval", "--run", run, "--max-audio-eval-samples", "4", "--max-vl-eval-samples", "4")
    assert table.returncode == 0, table.stderr
    assert "clips captioned" in table.stdout and "\nCIDEr-D " in table.stdout and "{" not in table.stdout
    as_json = safe_cli("eval", "--run", run, "--max-audio-eval-samples", "4", "--max-vl-eval-samples", "4", "--json")
    assert as_json.returncode == 0, as_json.stderr
    metrics = json.loads(as_json.stdout)
    assert metrics["audio_samples"] == 4 and metrics["vl_samples"] == 4
    # The subset is visible: 4 of the toy val split's 16 clips and 30 questions; every pair in the listening control.
    assert (metrics["audio_split_samples"], metrics["vl_split_samples"], metrics["audio_listen_samples"]) == (16, 30, 4)
    assert f"{metrics['audio_cider']:.2f}" in table.stdout                      # the table shows the same figure
