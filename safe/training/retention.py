"""Retention mechanisms of DESIGN §5: KL distillation, Fisher penalty, null-space gradient projection.

Each works on named trainable tensors, so it is independent of the model's structure and testable on small
modules. Statistics are kept in fp32.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F


def kl_distillation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 2.0
) -> torch.Tensor:
    """T² · KL(p_teacher ‖ p_student), averaged over the positions where `mask` is true (answer positions)."""
    mask = mask.to(torch.float32)
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = (teacher.exp() * (teacher - student)).sum(dim=-1)
    return temperature**2 * (per_position * mask).sum() / mask.sum().clamp(min=1.0)


class FisherPenalty:
    """EWC-style Σ_i F_i (θ_i − θ⁰_i)² with θ⁰ the identity initialisation and F the diagonal Fisher.

    F is the mean squared per-sample gradient of the VL log-likelihood (base answers, distractor audio), divided
    by its mean over all entries so that `fisher_weight` has the same meaning whatever the model's size.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.anchor = {name: p.detach().clone() for name, p in params.items()}
        self.fisher: dict[str, torch.Tensor] | None = None

    def estimate(self, sample_nlls: Iterable[Callable[[], torch.Tensor]]) -> int:
        """Each callable returns one sample's negative log-likelihood; returns how many were used."""
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
        if count == 0:
            return 0
        mean = sum(t.sum() for t in totals) / sum(t.numel() for t in totals) / count
        scale = 1.0 / (mean * count) if mean > 0 else 0.0
        self.fisher = {name: total * scale for name, total in zip(names, totals)}
        return count

    def state_dict(self) -> dict:
        return {"anchor": self.anchor, "fisher": self.fisher}

    def load_state_dict(self, state: dict) -> None:
        self.anchor = state["anchor"]
        self.fisher = state["fisher"]

    def penalty(self) -> torch.Tensor:
        device = next(iter(self.params.values())).device
        total = torch.zeros((), device=device)
        if self.fisher is None:
            return total
        for name, fisher in self.fisher.items():
            param = self.params[name]
            total = total + (fisher.to(param.device) * (param.float() - self.anchor[name].to(param.device)) ** 2).sum()
        return total


class NullSpaceProjector:
    """Per tensor, a streaming rank-r basis of protected (VL-likelihood) gradient directions.

    Each new gradient is merged into the basis by a small eigen-decomposition of the (r+1)×(r+1) Gram matrix
    (frequent-directions style), so memory stays O(r·params). `project_` removes a gradient's component in the
    basis: afterwards its dot product with every protected direction is ~0.
    """

    def __init__(self, rank: int, eps: float = 1e-10):
        if rank < 1:
            raise ValueError("null-space rank must be >= 1")
        self.rank = rank
        self.eps = eps
        self.bases: dict[str, torch.Tensor] = {}  # name -> [k, n] orthonormal rows
        self.scales: dict[str, torch.Tensor] = {}  # name -> [k] singular values

    def reset(self) -> None:
        self.bases.clear()
        self.scales.clear()

    def add(self, grads: dict[str, torch.Tensor]) -> None:
        for name, grad in grads.items():
            if grad is None:
                continue
            vector = grad.detach().reshape(1, -1).float()
            if name in self.bases:
                rows = torch.cat([self.scales[name][:, None] * self.bases[name], vector])
            else:
                rows = vector
            gram = rows @ rows.T
            values, vectors = torch.linalg.eigh(gram)  # ascending
            values, vectors = values.flip(0)[: self.rank], vectors.flip(1)[:, : self.rank]
            keep = values > self.eps * max(float(values[0]), 1e-30)
            if not keep.any():
                continue
            values, vectors = values[keep], vectors[:, keep]
            sigma = values.sqrt()
            basis = (vectors.T @ rows) / sigma[:, None]
            # Re-orthonormalise against round-off.
            basis = torch.linalg.qr(basis.T).Q.T
            self.bases[name], self.scales[name] = basis, sigma

    def project_(self, grads: dict[str, torch.Tensor]) -> None:
        """Remove, in place, the component of each gradient that lies in its protected basis."""
        for name, grad in grads.items():
            basis = self.bases.get(name)
            if grad is None or basis is None:
                continue
            flat = grad.reshape(-1)
            basis = basis.to(flat.device)
            coefficients = basis @ flat.float()
            flat.sub_((basis.T @ coefficients).to(flat.dtype))

    def state_dict(self) -> dict:
        return {"bases": self.bases, "scales": self.scales}

    def load_state_dict(self, state: dict) -> None:
        self.bases, self.scales = dict(state["bases"]), dict(state["scales"])
