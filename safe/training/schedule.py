"""Learning-rate schedule and optimiser parameter groups (DESIGN §5)."""

from __future__ import annotations

import math

import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to 0, counted in optimizer steps (not micro-batches)."""
    warmup_steps = max(0, min(warmup_steps, total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases and gate scalars are not weight-decayed."""
    lowered = name.lower()
    return param.ndim <= 1 or "norm" in lowered or "alpha" in lowered or "gate" in lowered


def build_optimizer(named_groups: dict[str, dict[str, torch.nn.Parameter]], lrs: dict[str, float],
                    weight_decay: float) -> torch.optim.AdamW:
    """AdamW with one group per (component, decay/no-decay); component names map to learning rates."""
    groups = []
    for component, params in named_groups.items():
        decay = [p for n, p in params.items() if p.requires_grad and not is_no_decay(n, p)]
        no_decay = [p for n, p in params.items() if p.requires_grad and is_no_decay(n, p)]
        for tensors, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if tensors:
                groups.append({"params": tensors, "lr": lrs[component], "weight_decay": wd, "name": component})
    return torch.optim.AdamW(groups)
