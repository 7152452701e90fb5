"""`safe report` on a run whose train_log.jsonl ends in a line cut short (a kill or a full disk mid-write) skips
that line with a warning; a damaged line elsewhere is one sentence naming file and line. Real run folders, the
real command in its own process."""

import json
import subprocess
import sys
from pathlib import Path

from safe.training.outputs import RunLogger, write_json_atomic

REPO = Path(__file__).resolve().parents[1]


def make_run(root: Path, name: str) -> Path:
    run = root / name
    write_json_atomic(run / "metrics.json", {
        "validation": {"audio_cider": 50.0, "vl_base_accuracy": 80.0},
        "history": [{"step": 2, "audio_cider": 40.0}, {"step": 4, "audio_cider": 50.0}],
        "training": {"variant": "soft_retention", "step": 4}, "throughput": {}})
    logger = RunLogger(run)
    for step in range(1, 5):
        logger.log({"event": "train", "step": step, "caption_loss": 3.0 - 0.5 * step})
    return run


def report(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "safe.cli", "report", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_a_partial_last_log_line_is_skipped(tmp_path):
    run = make_run(tmp_path / "runs", "20250101_000000_soft_retention")
    with open(run / "train_log.jsonl", "a") as handle:
        handle.write('{"time": 1.0, "event": "train", "step": 5, "caption_lo')  # killed mid-write
    done = report(tmp_path / "runs", "--out", tmp_path / "report")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"{run / 'train_log.jsonl'}:5: skipped the last line" in done.stderr
    assert "20250101_000000_soft_retention" in done.stdout and (tmp_path / "report" / "learning_curves.png").is_file()


def test_a_damaged_line_inside_the_log_is_one_sentence(tmp_path):
    run = make_run(tmp_path / "runs", "20250101_000000_soft_retention")
    lines = (run / "train_log.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (run / "train_log.jsonl").write_text("\n".join(lines) + "\n")
    done = report(run, "--out", tmp_path / "report")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"{run / 'train_log.jsonl'}:2: not a JSON record" in done.stderr
    assert json.loads(lines[0])["step"] == 1
