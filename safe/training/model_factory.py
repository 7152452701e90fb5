"""RunConfig.model -> the model preset and the SAFE model (the one place the trainer builds a model)."""

from __future__ import annotations

import torch

from safe.models.presets import AUDIO_ENCODERS, ModelPreset, get_preset


def preset_for(config) -> ModelPreset:
    model = config.model
    overrides = {"fusion": model.fusion, "lora_rank": model.lora_rank, "num_audio_tokens": model.num_audio_tokens,
                 "xattn_layers": model.xattn_layers, "xattn_gate": model.xattn_gate,
                 "system_prompt": model.system_prompt,
                 "pad_to_square": model.pad_to_square}
    if model.base_model:
        overrides["base_model"] = model.base_model
    if model.audio_encoder in AUDIO_ENCODERS:
        overrides["audio_encoder"] = model.audio_encoder
    elif model.audio_encoder:  # a hub id or a local folder: CLAP unless the name says Whisper
        overrides["audio_encoder"] = "whisper" if "whisper" in model.audio_encoder.lower() else "clap"
        overrides["audio_encoder_path"] = model.audio_encoder
    return get_preset(model.preset, **overrides)


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
