"""Retention across ranks (torchrun, 2 gloo processes): decisions taken together, the Fisher a mean over every
rank's samples even when one rank has none, and one null-space direction per sample whatever the number of GPUs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from safe.retention.null_space import NullSpaceProjector

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "helpers"))
from ranks_worker import SAMPLES  # noqa: E402


def test_retention_steps_agree_across_ranks_and_keep_one_direction_per_sample(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "helpers" /
                                                                            "ranks_worker.py"), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))

    # The gate decision is rank 0's "open" on both ranks (a rank that skipped would hang the others).
    assert rank0["decision"] is True and rank1["decision"] is True

    # Rank 0 had no finite sample and still joined the estimate: F is the mean over rank 1's two samples, and
    # both ranks report the 2 samples behind it.
    assert (rank0["fisher_used"], rank1["fisher_used"]) == (2, 2)
    expected = (SAMPLES[1][0] ** 2 + SAMPLES[1][1] ** 2) / 2
    assert torch.equal(rank0["fisher"], expected) and torch.equal(rank1["fisher"], expected)

    # Sample 0 is rank 0's, sample 1 rank 1's: both ranks hold the basis one process builds from those two
    # gradients (rank 2), not one built from the ranks' averages.
    single = NullSpaceProjector({"w": torch.nn.Parameter(torch.zeros(4))}, rank=2)
    single.add({"w": SAMPLES[0][0]})
    single.add({"w": SAMPLES[1][1]})
    for state in (rank0, rank1):
        assert state["samples"] == 2 and torch.allclose(state["basis"], single.basis, atol=1e-6)
    averaged = NullSpaceProjector({"w": torch.nn.Parameter(torch.zeros(4))}, rank=2)
    for index in range(2):  # what averaging every rank's own sample built: a mean of unrelated questions
        averaged.add({"w": (SAMPLES[0][index] + SAMPLES[1][index]) / 2})

    def unprotected(basis, gradient):
        return float((gradient - basis.T @ (basis @ gradient)).norm())

    for gradient in (SAMPLES[0][0], SAMPLES[1][1]):
        assert unprotected(rank0["basis"], gradient) < 1e-5 and unprotected(averaged.basis, gradient) > 0.1
