"""Null-space projection: training moves the parameters only orthogonally to directions that change the VL answers.

The protected directions are a rank-r basis U of VL-likelihood gradients, one per sample (so rank r really is r),
taken jointly over the protected tensors (one basis of the concatenated parameter vector; memory O(r·params)) and
refreshed every ``null_space_refresh`` steps. The promise is kept on the **applied update**: AdamW rescales each
coordinate and adds weight decay, which turns a projected gradient into an update with a component along U again
(measured: 1.7e-2 relative, as much as a random direction). So the optimizer's step is projected too:

    g ← g − Uᵀ(U g)                     before the step: the moments see what the update will be (Adam-NSCL's idea)
    θ ← θ₀ + (Δ − Uᵀ(U Δ)), Δ = θ − θ₀  after the step: the change of θ is orthogonal to every protected u

Never protected: gate scalars (safe.retention.gates) and tensors with numel ≤ r, whose whole space a rank-r basis
could cover; those are left to KL retention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch

from safe.retention.gates import is_gate
from safe.retention.ranks import Ranks


class NullSpaceProjector:
    def __init__(self, params: dict[str, torch.nn.Parameter], rank: int, eps: float = 1e-6):
        if rank < 1:
            raise ValueError("null-space rank must be >= 1")
        self.rank, self.eps = rank, eps
        self.params = {name: p for name, p in params.items()
                       if p.requires_grad and not is_gate(name) and p.numel() > rank}
        self.basis: torch.Tensor | None = None   # [k, P] orthonormal rows over the concatenated protected tensors
        self.scales: torch.Tensor | None = None  # [k] singular values of the gradients merged so far
        self.samples = 0

    @property
    def protected(self) -> list[str]:
        return list(self.params)

    @property
    def dimension(self) -> int:
        return 0 if self.basis is None else int(self.basis.shape[0])

    def reset(self) -> None:
        self.basis, self.scales, self.samples = None, None, 0

    def _flat(self, tensors: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        parts = []
        for name, p in self.params.items():
            t = tensors.get(name)
            parts.append(torch.zeros(p.numel(), device=p.device) if t is None else t.detach().reshape(-1).float())
        return torch.cat(parts)

    def add(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Merge one gradient into the basis: the top-r right singular vectors of [basis rows scaled; g], from the
        (k+1)×(k+1) Gram matrix, so memory stays O(r·P) however many gradients are merged."""
        vector = self._flat(grads)[None]
        if not torch.isfinite(vector).all() or float(vector.norm()) == 0.0:
            return
        if self.basis is None:
            rows = vector
        else:
            assert self.scales is not None  # set together with the basis
            rows = torch.cat([self.scales[:, None] * self.basis, vector])
        values, vectors = torch.linalg.eigh(rows @ rows.T)          # ascending
        values, vectors = values.flip(0)[: self.rank], vectors.flip(1)[:, : self.rank]
        keep = values > self.eps * float(values[0])
        values, vectors = values[keep], vectors[:, keep]
        basis = (vectors.T @ rows) / values.sqrt()[:, None]
        self.basis = torch.linalg.qr(basis.T).Q.T                    # re-orthonormalise against round-off
        self.scales = values.sqrt()
        self.samples += 1

    def add_owned(self, index: int, gradient: Callable[[], Mapping[str, torch.Tensor | None]], ranks: Ranks) -> None:
        """Merge sample ``index``'s gradient into the basis on every rank alike. The ranks share the samples out
        round-robin: the owner computes ``gradient()`` and the others send zeros, so the average over ranks is that
        one sample's gradient. (Averaging every rank's own sample would protect a mean of unrelated questions,
        none of them, and the basis would change with the number of GPUs.)"""
        share: dict[str, torch.Tensor] = {
            name: torch.zeros_like(p, dtype=torch.float32) for name, p in self.params.items()}
        if ranks.owns(index):
            share.update({name: g.float() * ranks.world_size for name, g in gradient().items()
                          if g is not None and name in share})
        self.add(ranks.average(share))

    def _project_(self, tensors: Mapping[str, torch.Tensor | None]) -> None:
        """tensors[name] -= (Uᵀ U v) restricted to name, in place, for the concatenated v."""
        if self.basis is None:
            return
        present = {name: t for name, t in tensors.items() if name in self.params and t is not None}
        coefficients = self.basis @ self._flat(present)
        offset = 0
        for name, p in self.params.items():
            n = p.numel()
            if name in present:
                block = self.basis[:, offset:offset + n]
                present[name].sub_((coefficients @ block).view_as(present[name]).to(present[name].dtype))
            offset += n

    def project_gradients_(self) -> None:
        self._project_({name: p.grad for name, p in self.params.items()})

    @contextlib.contextmanager
    def protected_update(self):
        """Around ``optimizer.step()``: afterwards the parameter change is orthogonal to the protected directions."""
        if self.basis is None:
            yield
            return
        before = {name: p.detach().clone() for name, p in self.params.items()}
        yield
        with torch.no_grad():
            delta = {name: p.detach() - before[name] for name, p in self.params.items()}
            self._project_(delta)
            for name, p in self.params.items():
                p.copy_(before[name] + delta[name])

    def state_dict(self) -> dict:
        return {"basis": self.basis, "scales": self.scales, "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        # A checkpoint is read onto the CPU: the basis goes back to the parameters' device (a GPU run's gradients).
        device = next(iter(self.params.values())).device if self.params else None
        self.basis, self.scales = (None if t is None else t.to(device) for t in (state["basis"], state["scales"]))
        self.samples = state.get("samples", 0)
