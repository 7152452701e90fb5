"""What retention needs of the other ranks, as plain callables: the process group itself lives in
safe.training.distributed, a layer above. The default is one process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def _same(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return tensors


def _flag(flag: bool) -> bool:
    return flag


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    # Each tensor of the dict averaged over the ranks (every rank passes the same names and shapes).
    average: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = _same
    # True on every rank when the flag is true on any: a decision all ranks must take together.
    any_true: Callable[[bool], bool] = _flag

    def owns(self, index: int) -> bool:
        """Whether this rank computes item ``index`` of a sequence the ranks share out round-robin."""
        return index % self.world_size == self.rank
