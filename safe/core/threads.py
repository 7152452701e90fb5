"""Intra-op threads: one for the tiny preset, the caller's choice otherwise.

A tiny model's matrix products are too small to split: on the 2-core development machine a tiny-preset training step
took 29-42 ms on one thread and 250-310 ms on both cores, and with two such jobs at once 60-145 ms vs 1.6-2.3 s
(OpenMP threads spinning against each other; benchmarks/bench_threads.py, measured under a load average of 4-8). An
explicit OMP_NUM_THREADS is the user's choice and is kept (torch reads it at start-up). DataLoader workers already run
on one thread each (torch sets it in every worker), which suits decoding.
"""

from __future__ import annotations

import os

import torch


def set_intra_op_threads(preset, device: torch.device) -> int:
    """Set torch's intra-op threads for running ``preset`` on ``device``; returns the count in force."""
    if preset.base_model == "tiny" and device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(1)
    return torch.get_num_threads()
