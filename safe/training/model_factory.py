"""RunConfig.model -> the model preset and the SAFE model (the one place the trainer builds a model)."""

from __future__ import annotations

import torch

from safe.models.encoder_registry import sample_rate


def audio_settings(config) -> tuple[int, float]:
    """(sample rate, clip seconds) the data layer must produce for this run's audio encoder."""
    preset = config.model
    return sample_rate(preset.audio_encoder, preset.audio_encoder_path), preset.clip_seconds


def build_model(config, device: torch.device):
    from safe.core.threads import set_intra_op_threads
    from safe.models.factory import build_safe_model

    preset = config.model
    set_intra_op_threads(preset, device)
    return build_safe_model(preset, device=device)
