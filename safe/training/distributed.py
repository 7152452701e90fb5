"""Multi-process training under `torchrun`: process group, gradient averaging, gathering.

Why not the `DistributedDataParallel` wrapper: it broadcasts and hooks every parameter of the module it wraps
(a frozen 7B/13B base included), and our trainable parts run through forward hooks and several passes per step
(student, teacher, generation), which DDP's reducer does not follow. What DDP would do for us here is average the
trainable gradients once per optimizer step (its `no_sync` on accumulation micro-steps); `average_gradients`
does exactly that, over the trainable tensors only, in one flattened all-reduce. Frozen parts are never
synchronised: every rank loads the same frozen weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[DistInfo, torch.device]:
    """Process group from torchrun's environment (NCCL on GPU, gloo on CPU); a plain run is world size 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(params: list[torch.Tensor], info: DistInfo) -> None:
    """Average `.grad` of `params` over ranks in one flattened all-reduce (missing grads count as zero)."""
    if not info.enabled:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def average_tensors(tensors: dict[str, torch.Tensor], info: DistInfo) -> dict[str, torch.Tensor]:
    """Average a dict of same-shaped tensors over ranks (e.g. Fisher estimates, protected gradients)."""
    if not info.enabled:
        return tensors
    out = {}
    for name, tensor in tensors.items():
        reduced = tensor.detach().clone()
        dist.all_reduce(reduced)
        out[name] = reduced / info.world_size
    return out


def _flag(flag: bool) -> torch.Tensor:
    """A one-element tensor on the device the process group's backend communicates from."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    return torch.tensor([1.0 if flag else 0.0], device=device)


def _reduce_flag(flag: bool, info: DistInfo, op) -> bool:
    if not info.enabled:
        return flag
    value = _flag(flag)
    dist.all_reduce(value, op=op)
    return bool(value.item() > 0.5)


def all_true(flag: bool, info: DistInfo) -> bool:
    """True only when every rank's flag is true (non-finite guard, gate check, cache hits)."""
    return _reduce_flag(flag, info, dist.ReduceOp.MIN)


def any_true(flag: bool, info: DistInfo) -> bool:
    """True when any rank's flag is true (a stop signal seen by one rank stops all at the same step)."""
    return _reduce_flag(flag, info, dist.ReduceOp.MAX)


def gather_dict(values: dict, info: DistInfo) -> dict:
    """Merge per-rank dicts (e.g. predictions by id) on every rank."""
    if not info.enabled:
        return values
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, values)
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def broadcast_object(value, info: DistInfo):
    """Rank 0's value on every rank (e.g. the run folder name)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
