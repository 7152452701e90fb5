"""A preset's SAFE model on the meta device: every shape and parameter count, no memory, no download.

The base's architecture comes from its config: a local folder's, the Hugging Face cache's (never the network), the
cached tiny base's, or, for the LLaVA-1.5 presets when nothing is cached, the architecture written down below. The
audio encoder's likewise (CLAP htsat-unfused and Whisper-small defaults).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from safe.core.errors import SafeError
from safe.core.quiet import note
from safe.models.audio_encoders import FrozenAudioEncoder, TinyConvEncoder
from safe.models.loading import looks_like_path
from safe.models.presets import ModelConfig
from safe.models.safe_model import SAFEModel

# Architectures of the real presets, so parameters can be counted on the meta device without a download.
KNOWN_BASES: dict[str, dict[str, Any]] = {
    "llava-hf/llava-1.5-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=32),
    "llava-hf/llava-1.5-13b-hf": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                      num_attention_heads=40, num_key_value_heads=40),
}
WHISPER_SMALL: dict[str, Any] = dict(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                     decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)


def _known_llava(name: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=32064, max_position_embeddings=4096, **KNOWN_BASES[name])
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    # image_token_id: an alias (attribute_map) of image_token_index that the signature does not list
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=32000,  # type: ignore[call-arg]
                       vision_feature_layer=-2, projector_hidden_act="gelu")


def _cached_config(cls, name: str | None):
    """``cls.from_pretrained`` from a local folder or the Hugging Face cache only; None when neither has it."""
    try:
        return cls.from_pretrained(name, local_files_only=True)
    except Exception:  # not cached (transformers / huggingface_hub raise their own kinds)
        return None


def base_config(preset: ModelConfig, log=note):
    """(the base's LlavaConfig, where it came from, in words)."""
    from transformers import AutoConfig

    name = preset.base_model
    if name == "tiny":
        from safe.models.tiny_base import ensure_tiny_base

        return AutoConfig.from_pretrained(ensure_tiny_base(preset.tiny_seed, log=log)), "the cached tiny base"
    if looks_like_path(name):
        if not Path(name).expanduser().is_dir():
            raise SafeError(f"The base model folder '{name}' does not exist; pass a folder written by "
                            "save_pretrained with --base-model PATH.")
        return AutoConfig.from_pretrained(str(Path(name).expanduser())), f"the config in {name}"
    config = _cached_config(AutoConfig, name)
    if config is not None:
        return config, f"{name}'s config in the Hugging Face cache"
    if name in KNOWN_BASES:
        return _known_llava(name), f"{name}'s known architecture (its config is not cached)"
    raise SafeError(f"The config of the base model '{name}' is not in the local Hugging Face cache, and its "
                    "architecture is not known offline; fetch it with `safe models download` or pass a local copy "
                    "with --base-model PATH.")


def _meta_audio(preset: ModelConfig):
    """(frozen audio module on the meta device or None, feature width)."""
    from transformers import ClapAudioModelWithProjection, ClapConfig, WhisperConfig, WhisperModel

    if preset.audio_encoder == "clap":
        full = _cached_config(ClapConfig, preset.encoder_path)
        config = full.audio_config if full is not None else ClapConfig().audio_config  # htsat-unfused's tower
        # ClapConfig builds audio_config as a ClapAudioConfig (its annotation also allows a dict or None)
        audio = ClapAudioModelWithProjection(config).audio_model  # type: ignore[arg-type]
        return audio, audio.config.hidden_size
    if preset.audio_encoder == "whisper":
        config = _cached_config(WhisperConfig, preset.encoder_path) or WhisperConfig(**WHISPER_SMALL)
        return WhisperModel(config).get_encoder(), config.d_model
    return TinyConvEncoder(seed=preset.tiny_seed, clip_seconds=preset.clip_seconds), TinyConvEncoder().feature_dim


class _MetaEncoder(FrozenAudioEncoder):
    def __init__(self, module, feature_dim: int, encoder_id: str):
        super().__init__()
        self.module, self.feature_dim, self.encoder_id = module, feature_dim, encoder_id
        self.sample_rate, self.clip_seconds = 0, 0.0


def build_on_meta(preset: ModelConfig, log=note) -> SAFEModel:
    """The preset's SAFE model with every weight on the meta device (no memory, no download)."""
    from transformers import LlavaForConditionalGeneration

    config, _ = base_config(preset, log=log)
    with torch.device("meta"):
        base = LlavaForConditionalGeneration(config)
        audio, dim = _meta_audio(preset)
        return SAFEModel(base, None, _MetaEncoder(audio, dim, f"meta:{preset.audio_encoder}"), preset)


def count_parameters(preset: ModelConfig, model: SAFEModel | None = None) -> dict:
    """Trainable / frozen parameter counts of ``preset`` (built on the meta device unless ``model`` is given)."""
    model = model if model is not None else build_on_meta(preset)
    parts = {"projector": 0, "xattn": 0, "lora": 0}
    for name, p in model.named_trainable_parameters().items():
        key = "projector" if name.startswith("projector.") else "xattn" if name.startswith("fusion.") else "lora"
        parts[key] += p.numel()
    frozen = model.frozen_parameters()
    encoder = sum(p.numel() for name, p in frozen.items() if name.startswith("audio_encoder."))
    total = sum(p.numel() for p in frozen.values())
    return {"preset": preset.preset, "trainable": sum(parts.values()), "frozen": total, **parts,
            "frozen_base": total - encoder, "frozen_audio_encoder": encoder}
