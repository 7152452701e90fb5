"""Fault injection for the crash tests: ``SAFE_FAULT_AT=<point>:<n>`` makes the process kill itself (SIGKILL, as an
OOM killer or a node failure would) the n-th time it reaches ``<point>``. Unset, every call is a no-op."""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def reached(point: str) -> None:
    target = os.environ.get("SAFE_FAULT_AT")
    if not target:
        return
    name, _, count = target.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
