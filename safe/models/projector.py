"""Projector: frozen encoder features [B, T, D] -> k audio tokens [B, k, H] in the LLM's width."""

from __future__ import annotations

import math

import torch
from torch import nn


def pre_pool_grid(num_tokens: int, steps: int | None) -> int | None:
    """The fixed grid the projector pools its input to first: the smallest multiple of k that is at least ``steps``
    (32 -> 32 for k = 16 or 8, 36 for k = 12), so the second pooling, to k, averages equal cells. None: no grid."""
    return None if steps is None else num_tokens * math.ceil(steps / num_tokens)


def pre_pool(features: torch.Tensor, grid: int | None) -> torch.Tensor:
    """Encoder features [B, T, D] averaged to ``grid`` steps (adaptive average pooling, computed in fp32, returned in
    the features' dtype); unchanged when T <= grid. Parameter-free and deterministic: the feature cache stores this,
    and the projector, given it back, skips the step (T == grid), so a cached feature is what the projector would
    have computed. For T a multiple of the grid (CLAP's 64 patches, grid 32) the two poolings equal one pooling to k."""
    if grid is None or features.shape[1] <= grid:
        return features
    pooled = nn.functional.adaptive_avg_pool1d(features.float().transpose(1, 2), grid).transpose(1, 2)
    return pooled.to(features.dtype)


class AudioProjector(nn.Module):
    """Adaptive average pooling to the pre-pool grid (when set), then to k steps, a learned position per token, then
    LN -> MLP -> LN.

    The position embedding lets k tokens differ even when the encoder gives one pooled vector.
    The output LayerNorm gain starts at ``out_scale`` (the RMS of the LLM's word embeddings), so
    prefix-mode tokens enter the LLM at the scale of ordinary tokens.
    """

    def __init__(self, feature_dim: int, hidden_size: int, num_tokens: int, out_scale: float = 1.0,
                 pre_pool_steps: int | None = None):
        super().__init__()
        self.feature_dim, self.hidden_size, self.num_tokens = feature_dim, hidden_size, num_tokens
        self.grid = pre_pool_grid(num_tokens, pre_pool_steps)
        self.pool = nn.AdaptiveAvgPool1d(num_tokens)
        self.position = nn.Parameter(torch.zeros(num_tokens, feature_dim))
        self.in_norm = nn.LayerNorm(feature_dim)
        self.fc1 = nn.Linear(feature_dim, hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.out_norm = nn.LayerNorm(hidden_size)
        self.reset_parameters(out_scale)

    def reset_parameters(self, out_scale: float = 1.0) -> None:
        nn.init.normal_(self.position, std=0.02)
        for linear in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.in_norm.reset_parameters()
        self.out_norm.reset_parameters()
        with torch.no_grad():
            self.out_norm.weight.fill_(out_scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        features = pre_pool(features, self.grid).to(self.fc1.weight.dtype)
        pooled = self.pool(features.transpose(1, 2)).transpose(1, 2)   # [B, k, D]
        hidden = self.in_norm(pooled + self.position)
        return self.out_norm(self.fc2(self.act(self.fc1(hidden))))
