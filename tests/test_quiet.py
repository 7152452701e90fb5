"""Quiet by default: a command that loads models prints no transformers progress bar ("Loading weights"); --verbose
brings them back. The real command in its own process, its real output captured."""

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.local_run import make_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_and_clip(tmp_path, tone_writer):
    root = tmp_path
    run, _ = make_run(root)
    clip = root / "tone.wav"
    tone_writer(clip, 1.0, 16000)
    return run, clip


def caption(run, clip, *extra):
    return subprocess.run([sys.executable, "-m", "safe", "caption", "--run", str(run), "--audio", str(clip),
                           "--max-new-tokens", "2", *extra], capture_output=True, text=True, cwd=REPO, timeout=600)


def test_no_library_progress_bar_by_default_and_back_with_verbose(run_and_clip):
    run, clip = run_and_clip
    quiet = caption(run, clip)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith(f"{clip}\t")
    assert "Loading weights" not in quiet.stderr and "it/s]" not in quiet.stderr, quiet.stderr
    verbose = caption(run, clip, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert "Loading weights" in verbose.stderr                              # the bar the default hides
    assert verbose.stdout == quiet.stdout
