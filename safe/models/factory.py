"""Build a SAFEModel from a preset: load (or build) the frozen parts, add the trainable ones."""

from __future__ import annotations

from pathlib import Path

import torch

from safe.core.errors import SafeError
from safe.core.quiet import note
from safe.models.audio_encoders import ClapEncoder, FrozenAudioEncoder, TinyConvEncoder, WhisperEncoderWrapper
from safe.models.loading import default_dtype, load_model, load_pretrained, looks_like_path
from safe.models.meta import KNOWN_BASES, build_on_meta, count_parameters  # noqa: F401 (imported from here by callers)
from safe.models.presets import ModelConfig
from safe.models.safe_model import SAFEModel
from safe.models.staging import require_models


def load_audio_encoder(preset: ModelConfig, device=None, dtype=None,
                       tiny_dir: Path | None = None) -> FrozenAudioEncoder:
    kind, name = preset.audio_encoder, preset.encoder_path
    if kind == "tiny":
        if preset.audio_encoder_path:
            encoder = TinyConvEncoder.load(Path(preset.audio_encoder_path))
        elif tiny_dir is not None and (tiny_dir / "audio_encoder").is_dir():
            encoder = TinyConvEncoder.load(tiny_dir / "audio_encoder")
        else:
            encoder = TinyConvEncoder(seed=preset.tiny_seed, clip_seconds=preset.clip_seconds)
        return encoder.to(device) if device is not None else encoder
    if kind == "clap":
        from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor

        assert name is not None  # clap has a default checkpoint
        # The audio tower + projection load from a full CLAP checkpoint; the text tower is never loaded.
        full = load_model(ClapAudioModelWithProjection, name, what="CLAP audio encoder", flag="--audio-encoder",
                          dtype=dtype, device=device)
        extractor = load_pretrained(ClapFeatureExtractor, name, what="CLAP feature extractor", flag="--audio-encoder")
        return ClapEncoder(full.audio_model, extractor, name, preset.audio_features, preset.clip_seconds)
    if kind == "whisper":
        from transformers import WhisperFeatureExtractor, WhisperModel

        assert name is not None  # whisper has a default checkpoint
        model = load_model(WhisperModel, name, what="Whisper encoder", flag="--audio-encoder", dtype=dtype)
        encoder = model.get_encoder()
        del model                                 # the decoder is never used; drop it right away
        extractor = load_pretrained(WhisperFeatureExtractor, name, what="Whisper feature extractor",
                                    flag="--audio-encoder")
        encoder = encoder.to(device) if device is not None else encoder
        return WhisperEncoderWrapper(encoder.eval(), extractor, name, preset.clip_seconds)
    raise SafeError(f"Unknown audio encoder {kind!r}; use clap, whisper or tiny.")


def padding_image_processor(image_processor):
    """The same preprocessing, after padding each image to a square with the processor's mean colour: how
    LLaVA-1.5 was trained and evaluated ("pad" aspect ratio), where the CLIP processor alone centre-crops and so
    cuts off the sides of a wide image. transformers' LlavaImageProcessorPil does exactly this with do_pad."""
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    settings = {key: getattr(image_processor, key) for key in (
        "size", "crop_size", "resample", "do_resize", "do_center_crop", "do_rescale", "rescale_factor",
        "do_normalize", "image_mean", "image_std", "do_convert_rgb") if getattr(image_processor, key, None) is not None}
    return LlavaImageProcessorPil(**settings, do_pad=True)


def load_base(preset: ModelConfig, device=None, dtype=None, log=note):
    """(base model, processor, base name, tiny cache dir or None)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    tiny_dir = None
    source = preset.base_model
    if source == "tiny":
        from safe.models.tiny_base import ensure_tiny_base

        tiny_dir = ensure_tiny_base(preset.tiny_seed, log=log)
        source = str(tiny_dir)
    base = load_model(LlavaForConditionalGeneration, source, what="base model", flag="--base-model",
                      dtype=dtype, device=device)
    processor = load_pretrained(AutoProcessor, source, what="processor", flag="--base-model")
    if preset.pad_to_square:
        processor.image_processor = padding_image_processor(processor.image_processor)
    name = f"tiny:{tiny_dir.name}" if tiny_dir is not None else preset.base_model
    return base, processor, name, tiny_dir


def build_safe_model(preset: ModelConfig, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, log=note) -> SAFEModel:
    """The SAFE model of ``preset`` on ``device`` (frozen parts in ``dtype``: bf16 on GPU, fp32 on CPU)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype or default_dtype(device)
    # Offline, one error names every missing hub model before the first long load (a local base loads first, so a
    # wrong folder is reported as such).
    require_models(preset, roles=("base model", "audio encoder") if not looks_like_path(preset.base_model) else ())
    base, processor, name, tiny_dir = load_base(preset, device, dtype, log=log)
    require_models(preset, roles=("audio encoder",))
    encoder = load_audio_encoder(preset, device, dtype if preset.audio_encoder != "tiny" else None, tiny_dir)
    return SAFEModel(base, processor, encoder, preset, base_name=name)


def build_audio_encoder(preset: ModelConfig, device: str | torch.device | None = None, log=note) -> FrozenAudioEncoder:
    """The preset's frozen audio encoder alone, loaded exactly as build_safe_model loads it (same weights,
    device and dtype), so features computed with it land on the trainer's feature-cache entries."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    require_models(preset, roles=("audio encoder",))
    tiny_dir = None
    if preset.base_model == "tiny":  # the tiny encoder is saved inside the tiny base's cache entry
        from safe.models.tiny_base import ensure_tiny_base

        tiny_dir = ensure_tiny_base(preset.tiny_seed, log=log)
    dtype = default_dtype(device) if preset.audio_encoder != "tiny" else None
    return load_audio_encoder(preset, device, dtype, tiny_dir)

