"""benchmarks/gpu_check.py runs its whole code path on CPU with --cpu-smoke (the GPU run is manual)."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_smoke(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["shape"] == "smoke" and record["machine"]
    assert [(r["fusion"], r["activation_checkpointing"]) for r in record["results"]] == \
        [("xattn", False), ("prefix", False), ("xattn", True)]
    for r in record["results"]:
        assert r["step_ms"] > 0 and r["limit_ms"] > 0 and r["tokens_per_s"] > 0
        assert 0 < r["mfu"] < 1 and r["trainable_params"] > 0
    assert "MFU" in done.stdout and "tokens/s" in done.stdout
