"""Gated fusion of audio tokens into the frozen LLM.

``xattn``: a cross-attention adapter runs after chosen decoder layers through forward hooks, so the
base's modules and weight names stay untouched:  h <- h + g * gate_l(h) * XAttn(LN(h), LN(A)), with
gate_l = tanh(alpha_l) per layer ("layer", the default) or tanh(alpha_l + w_l . LN(h_t)) per token ("token": a
small function of the query hidden state, so VQA contexts can keep the base while caption contexts listen).
alpha_l and w_l start at 0, so a fresh adapter is the identity. When g is 0 or no audio is set, the
hook returns None and the layer's own output passes through untouched (bit-identical logits).

``prefix``: the k audio tokens are spliced into the input embeddings right after ``USER:``; the
attention mask and labels grow with them. No token is added to the vocabulary.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from safe.models.prompts import IGNORE_INDEX

GATES = ("layer", "token")


def is_gate(name: str) -> bool:
    """A gate parameter: the per-layer scalar alpha_l of an xattn adapter, or the weights of its per-token gate."""
    return name.endswith(".alpha") or ".token_gate." in name


def decoder_layers(base) -> nn.ModuleList:
    """The LLM's decoder layers (transformers 5: ``model.model.language_model.layers``)."""
    return base.model.language_model.layers


class XAttnAdapter(nn.Module):
    """One gated cross-attention block reading the audio tokens."""

    def __init__(self, hidden_size: int, dim: int, heads: int, gate: str = "layer"):
        super().__init__()
        if dim % heads:
            raise ValueError(f"xattn dim {dim} is not divisible by {heads} heads")
        if gate not in GATES:
            raise ValueError(f"unknown xattn gate {gate!r}; use one of {GATES}")
        self.heads = heads
        self.norm = nn.LayerNorm(hidden_size)
        self.kv_norm = nn.LayerNorm(hidden_size)
        self.q = nn.Linear(hidden_size, dim, bias=False)
        self.k = nn.Linear(hidden_size, dim, bias=False)
        self.v = nn.Linear(hidden_size, dim, bias=False)
        self.o = nn.Linear(dim, hidden_size, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))
        # Per-token gate: a linear read of the normalised query state added to alpha; zero-initialised, so it
        # starts as the per-layer gate (and, with alpha = 0, as the identity) yet has a gradient from step 0.
        self.token_gate = nn.Linear(hidden_size, 1) if gate == "token" else None
        self.token_gate_seen: torch.Tensor | None = None  # max |gate| over the tokens of the last audio forward
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # All weights are live from step 0: alpha=0 makes the block the identity, but `o` must not be
        # zero or alpha (whose gradient is the block's output) and the block could never start learning.
        for linear in (self.q, self.k, self.v):
            nn.init.xavier_uniform_(linear.weight)
        nn.init.normal_(self.o.weight, std=1.0 / math.sqrt(self.o.in_features))
        self.norm.reset_parameters()
        self.kv_norm.reset_parameters()
        with torch.no_grad():
            self.alpha.zero_()
            if self.token_gate is not None:
                self.token_gate.weight.zero_()
                self.token_gate.bias.zero_()

    def delta(self, hidden: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        b, t, _ = hidden.shape
        q = self.q(self.norm(hidden)).view(b, t, self.heads, -1).transpose(1, 2)
        kv = self.kv_norm(audio)
        k = self.k(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(kv).view(b, kv.shape[1], self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)            # every text position sees all k audio tokens
        return self.o(out.transpose(1, 2).reshape(b, t, -1))

    def gate_values(self, hidden: torch.Tensor) -> torch.Tensor:
        """tanh(alpha) (a scalar), or per token [B, T, 1] with the token gate."""
        if self.token_gate is None:
            return torch.tanh(self.alpha)
        return torch.tanh(self.alpha + self.token_gate(self.norm(hidden)))

    def openness(self) -> torch.Tensor:
        """How open this gate is (a 0-d tensor): |tanh(alpha)|, or for the token gate the largest |gate| it applied
        to a token in its last forward with audio (alpha alone would miss a gate opened by its token weights)."""
        if self.token_gate is not None and self.token_gate_seen is not None:
            return self.token_gate_seen
        return torch.tanh(self.alpha.detach()).abs()

    def forward(self, hidden: torch.Tensor, audio: torch.Tensor, gate: float) -> torch.Tensor:
        dtype = self.q.weight.dtype
        hidden_in = hidden.to(dtype)
        values = self.gate_values(hidden_in)
        if self.token_gate is not None:
            self.token_gate_seen = values.detach().abs().amax()   # a tensor: no device sync in the forward
        update = self.delta(hidden_in, audio.to(dtype)) * (gate * values)
        return hidden + update.to(hidden.dtype)


class XAttnFusion(nn.Module):
    """Adapters after decoder layers ``layers``, driven by forward hooks on the base."""

    def __init__(self, hidden_size: int, layers: tuple[int, ...], dim: int, heads: int, gate: str = "layer"):
        super().__init__()
        self.layer_ids = tuple(int(i) for i in layers)
        self.adapters = nn.ModuleDict({str(i): XAttnAdapter(hidden_size, dim, heads, gate) for i in self.layer_ids})
        self._audio: torch.Tensor | None = None
        self._gate = 0.0
        self._handles: list = []

    def attach(self, base) -> None:
        layers = decoder_layers(base)
        bad = [i for i in self.layer_ids if not 0 <= i < len(layers)]
        if bad:
            from safe.core.errors import SafeError
            raise SafeError(f"--xattn-layers {bad} are outside the base model's {len(layers)} decoder layers "
                            f"(0..{len(layers) - 1}).")
        for i in self.layer_ids:
            # prepend=True: hooks that capture hidden states (output_hidden_states) then see the adapted output.
            self._handles.append(layers[i].register_forward_hook(self._make_hook(str(i)), prepend=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, key: str):
        def hook(module, args, output):
            if self._audio is None or self._gate == 0:
                return None                                       # untouched base output
            hidden = output[0] if isinstance(output, tuple) else output
            audio = self._audio
            if audio.shape[0] != hidden.shape[0]:
                if hidden.shape[0] % audio.shape[0]:
                    raise RuntimeError(f"audio batch {audio.shape[0]} does not divide hidden batch {hidden.shape[0]}")
                audio = audio.repeat_interleave(hidden.shape[0] // audio.shape[0], dim=0)
            new = self.adapters[key](hidden, audio, self._gate)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    @contextlib.contextmanager
    def use(self, audio_tokens: torch.Tensor | None, gate: float):
        """Within the block, decoder layers read ``audio_tokens`` with gate ``gate``."""
        previous = (self._audio, self._gate)
        self._audio, self._gate = audio_tokens, float(gate)
        try:
            yield
        finally:
            self._audio, self._gate = previous


def splice_prefix(embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None,
                  splice_pos: torch.Tensor, audio_tokens: torch.Tensor):
    """Insert ``audio_tokens`` [B, k, H] into ``embeds`` [B, L, H] at ``splice_pos`` [B] (row-wise).

    Returns (embeds [B, L+k, H], attention_mask, labels (audio positions ignored), audio_mask).
    """
    b, length, hidden = embeds.shape
    k = audio_tokens.shape[1]
    device = embeds.device
    positions = torch.arange(length, device=device).unsqueeze(0).expand(b, -1)
    text_index = positions + k * (positions >= splice_pos.unsqueeze(1))          # where each text token goes
    audio_index = splice_pos.unsqueeze(1) + torch.arange(k, device=device).unsqueeze(0)
    out = embeds.new_zeros(b, length + k, hidden)
    out = out.scatter(1, text_index.unsqueeze(-1).expand(-1, -1, hidden), embeds)
    out = out.scatter(1, audio_index.unsqueeze(-1).expand(-1, -1, hidden), audio_tokens.to(embeds.dtype))
    mask = attention_mask.new_zeros(b, length + k).scatter(1, text_index, attention_mask)
    mask = mask.scatter(1, audio_index, torch.ones_like(audio_index, dtype=mask.dtype))
    audio_mask = torch.zeros(b, length + k, dtype=torch.bool, device=device).scatter(
        1, audio_index, torch.ones_like(audio_index, dtype=torch.bool))
    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((b, length + k), IGNORE_INDEX).scatter(1, text_index, labels)
    return out, mask, new_labels, audio_mask
