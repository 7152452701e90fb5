"""Fisher penalty: a quadratic penalty on the drift of the trainable parameters, weighted by how much each one moves
the VL answers.

penalty(θ) = ½ Σ_i F_i (θ_i − θ*_i)²,  F_i = E_x E_{y ~ p_θ*(·|x)} [ (∂ log p_θ*(y|x) / ∂θ_i)² ]

with x a VQA question carrying a distractor clip and y its answer sequence. F is the diagonal of the Fisher
information of the answer distribution at θ*, which is the Hessian of KL(p_θ* ‖ p_θ) at θ = θ*; so the penalty is
the second-order (diagonal) estimate of that KL, **in nats per answer**. It is not normalised by anything, and that
is why ``fisher_weight`` means the same on the tiny preset and on 13B: it prices a nat of predicted drift of the
VL answers, whatever the number of parameters. (Dividing F by its mean, as before, made the penalty scale with the
parameter count.)

Anchor θ* (online-EWC style): the state when the Fisher was taken, refreshed with it. At the identity init the
"base behaviour" pins only the gates and LoRA's B (any adapter weight is the base when its gate is 0), and anchoring
there would pin the gates shut; anchoring at the estimate's own state instead resists further drift in the
directions that move the VL answers, while KL distillation keeps that state at the base's answers.

"true" (default) samples y from the model; "empirical" uses the base's greedy answer. Gate scalars are left out
(safe.retention.gates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from safe.retention.gates import is_gate
from safe.retention.ranks import Ranks

_COUNT = "\0samples"  # the sample count travels with the sums (no parameter has this name)


class FisherPenalty:
    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = {name: p for name, p in params.items() if not is_gate(name)}
        self.fisher: dict[str, torch.Tensor] | None = None
        self.anchor: dict[str, torch.Tensor] | None = None
        self.samples = 0

    def estimate(self, sample_nlls: Iterable[Callable[[], torch.Tensor]], ranks: Ranks | None = None) -> int:
        """F from per-sample negative log-likelihoods (each callable returns one sample's NLL, summed over its
        answer tokens); the anchor becomes the current parameters. With ``ranks``, F is the mean over every rank's
        samples. Returns the number of samples behind F, over all ranks (non-finite ones are skipped); no estimate
        is taken when no rank has one."""
        names = [n for n, p in self.params.items() if p.requires_grad]
        tensors = [self.params[n] for n in names]
        totals = [torch.zeros_like(p, dtype=torch.float32) for p in tensors]
        count = 0
        for nll in sample_nlls:
            loss = nll()
            if not torch.isfinite(loss):
                continue
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for total, grad in zip(totals, grads):
                if grad is not None:
                    total.add_(grad.detach().float() ** 2)
            count += 1
        sums = dict(zip(names, totals))
        sums[_COUNT] = torch.tensor(float(count), device=totals[0].device if totals else None)
        world_size = 1
        if ranks is not None:  # every rank reaches this collective, whatever its count: sums and counts alike
            sums, world_size = ranks.average(sums), ranks.world_size
        mean_count = float(sums.pop(_COUNT))
        if mean_count == 0:
            return 0
        self.fisher = {name: total / mean_count for name, total in sums.items()}
        self.anchor = {name: self.params[name].detach().float().clone() for name in names}
        self.samples = round(mean_count * world_size)
        return self.samples

    def penalty(self) -> torch.Tensor:
        device = next(iter(self.params.values())).device
        total = torch.zeros((), device=device)
        if self.fisher is None:
            return total
        assert self.anchor is not None  # set together with the Fisher estimate
        for name, fisher in self.fisher.items():
            param = self.params[name]
            drift = param.float() - self.anchor[name].to(param.device)
            total = total + (fisher.to(param.device) * drift * drift).sum()
        return 0.5 * total

    def state_dict(self) -> dict:
        return {"fisher": self.fisher, "anchor": self.anchor, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.fisher, self.anchor, self.samples = state["fisher"], state["anchor"], state.get("samples", 0)
