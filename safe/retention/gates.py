"""Which trainable tensors are fusion gates, and how open the audio path is.

At the identity init (tanh α = 0) every projector and adapter weight has exactly zero gradient and only the gate
scalars α have one, so statistics of the VL gradient taken at the closed gate see the gates alone. The Fisher
penalty and the null-space projection therefore start once the path is open, and never act on the gate scalars
themselves: a gate scales its whole adapter, so protecting it would keep the audio path shut (what KL retention
measures directly is what the gate does to the answers).
"""

from __future__ import annotations

import torch

from safe.models.fusion import is_gate  # noqa: F401  (re-exported: the retention code asks here)


def gate_openness(model: torch.nn.Module) -> float | None:
    """The largest gate over the xattn adapters: max_l |tanh α_l| (0 at the start), or for per-token gates the
    largest |gate| applied to a token in the last forward with audio; None when there are no gates (prefix fusion).
    Read every step: the adapters come from the model's fusion module (no walk over the base), one device sync."""
    fusion = getattr(model, "fusion", None)
    if fusion is None:
        return None
    return float(torch.stack([adapter.openness() for adapter in fusion.adapters.values()]).max())


def audio_path_open(model: torch.nn.Module, threshold: float) -> bool:
    """True once the gates have opened past ``threshold`` (always, for fusion without gates)."""
    openness = gate_openness(model)
    return openness is None or openness >= threshold
