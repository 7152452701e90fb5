"""Two first runs started together build the tiny base once: the second waits on the build lock and then loads the
first one's entry. Two real processes on a fresh cache folder, released at the same moment."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

WORKER = """
import sys, time
from pathlib import Path
from safe.models.tiny_base import ensure_tiny_base
cache, go = Path(sys.argv[1]), Path(sys.argv[2])
Path(sys.argv[3]).write_text("ready")
while not go.exists():
    time.sleep(0.01)
path = ensure_tiny_base(seed=0, cache_dir=cache, log=print,
                        overrides={"world_size": "small", "vision_steps": 5, "llm_steps": 5, "warmup": 1})
print("ENTRY", path, flush=True)
"""


def test_two_concurrent_first_runs_build_the_tiny_base_once(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(cache), str(go), str(flag)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flag in ready]
    deadline = time.time() + 300
    while not all(flag.exists() for flag in ready) and time.time() < deadline:  # both imported, both waiting
        time.sleep(0.05)
    go.write_text("go")
    outputs = [worker.communicate(timeout=900) for worker in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err
    builds = [out.count("Building the tiny base model") for out, _ in outputs]
    assert sorted(builds) == [0, 1], outputs                                   # one built, the other waited
    entries = {line.split(" ", 1)[1] for out, _ in outputs for line in out.splitlines() if line.startswith("ENTRY ")}
    assert len(entries) == 1
    entry = Path(entries.pop())
    assert (entry / "tiny_base.json").is_file() and entry.parent == cache
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [entry.name]  # no temp folder left
