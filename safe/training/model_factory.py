"""RunConfig.model -> the model preset and the SAFE model (the one place the trainer builds a model)."""

from __future__ import annotations

import torch

from safe.models.presets import preset_for


def audio_settings(config) -> tuple[int, float]:
    """(sample rate, clip seconds) the data layer must produce for this run's audio encoder."""
    preset = preset_for(config)
    rates = {"tiny": 16000, "whisper": 16000, "clap": 48000}
    return rates[preset.audio_encoder], preset.clip_seconds


def build_model(config, device: torch.device):
    from safe.models.factory import build_safe_model
    from safe.threads import set_intra_op_threads

    preset = preset_for(config)
    set_intra_op_threads(preset, device)
    return build_safe_model(preset, device=device)
