"""Model presets (``--model-config``) and the loaders of their frozen parts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from safe.core.errors import SafeError
from safe.models.encoder_registry import ENCODERS, encoder_kind

AUDIO_ENCODERS = tuple(ENCODERS)
FUSIONS = ("xattn", "prefix")


@dataclass
class ModelPreset:
    name: str
    base_model: str                          # hub id, local folder, or "tiny" (built and cached on first use)
    audio_encoder: str = "clap"              # clap | whisper | tiny
    audio_encoder_path: str | None = None    # hub id or local folder; None -> the encoder's default
    audio_features: str = "patch"            # CLAP: patch sequence (default) or pooled vector
    clip_seconds: float = 10.0
    num_audio_tokens: int = 16               # k
    pre_pool_steps: int | None = 32          # projector's fixed pre-pool grid (the feature cache stores it); None: off
    fusion: str = "xattn"                    # xattn | prefix
    xattn_layers: tuple[int, ...] | None = None   # None -> spread over depth
    num_xattn_layers: int = 3
    xattn_dim: int | None = None             # inner width of the cross-attention; None -> min(hidden, 1024)
    xattn_heads: int = 8
    xattn_gate: str = "layer"                # layer: tanh(alpha_l); token: tanh(alpha_l + w_l . LN(h_t)) per token
    lora_rank: int = 0                       # 0 = off
    lora_alpha: float | None = None          # None -> 2 * rank
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    tiny_seed: int = 0                       # tiny preset: seed of the toy world / base / audio encoder
    prompt_style: str = "llava_v1"           # safe.models.prompts.STYLES: llava_v1 (LLaVA-1.5's format) or tiny
    system_prompt: bool = True               # llava_v1: LLaVA-1.5's vicuna_v1 system message before every prompt
    pad_to_square: bool = True               # llava presets: pad images to square with the mean colour (LLaVA-1.5)

    def replace(self, **changes) -> "ModelPreset":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise SafeError(f"Unknown model option(s) {sorted(unknown)}; see `safe train --help`.")
        if changes.get("xattn_layers") is not None:
            changes["xattn_layers"] = tuple(int(i) for i in changes["xattn_layers"])
        if changes.get("lora_targets") is not None:
            changes["lora_targets"] = tuple(changes["lora_targets"])
        return dataclasses.replace(self, **changes).validated()

    def validated(self) -> "ModelPreset":
        if self.audio_encoder not in AUDIO_ENCODERS:
            raise SafeError(f"Unknown audio encoder {self.audio_encoder!r}; use one of {', '.join(AUDIO_ENCODERS)}.")
        if self.fusion not in FUSIONS:
            raise SafeError(f"Unknown fusion {self.fusion!r}; use one of {', '.join(FUSIONS)}.")
        if self.xattn_gate not in ("layer", "token"):
            raise SafeError(f"Unknown --xattn-gate {self.xattn_gate!r}; use layer or token.")
        if self.audio_features not in ("patch", "pooled"):
            raise SafeError(f"Unknown audio feature mode {self.audio_features!r}; use 'patch' or 'pooled'.")
        if self.num_audio_tokens < 1:
            raise SafeError("--num-audio-tokens must be at least 1.")
        if self.lora_rank < 0:
            raise SafeError("--lora-rank must be 0 (off) or positive.")
        return self

    @property
    def encoder_path(self) -> str | None:
        if self.audio_encoder_path:
            return self.audio_encoder_path
        return ENCODERS[self.audio_encoder].default_checkpoint

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(name="tiny", base_model="tiny", audio_encoder="tiny", clip_seconds=4.0,
                        num_audio_tokens=8, pre_pool_steps=None, num_xattn_layers=2, xattn_heads=4,
                        prompt_style="tiny", pad_to_square=False),
    "llava-1.5-7b": ModelPreset(name="llava-1.5-7b", base_model="llava-hf/llava-1.5-7b-hf"),
    "llava-1.5-13b": ModelPreset(name="llava-1.5-13b", base_model="llava-hf/llava-1.5-13b-hf"),
}
ALIASES = {"full": "llava-1.5-13b", "demo": "tiny"}


def preset_names() -> list[str]:
    return list(PRESETS) + list(ALIASES)


def get_preset(name: str, **overrides) -> ModelPreset:
    """Preset by name or alias (``full`` = llava-1.5-13b, ``demo`` = tiny), with overrides applied.

    ``None`` overrides are ignored so CLI flags left unset keep the preset's value.
    """
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise SafeError(f"Unknown model config {name!r}; use one of {', '.join(preset_names())}.")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("audio_encoder") == "whisper" and "audio_encoder_path" not in overrides:
        overrides.setdefault("audio_features", "patch")
    return PRESETS[key].replace(**overrides)


def resolved_preset(name: str, base_model: str | None = None, audio_encoder: str | None = None,
                    **overrides) -> ModelPreset:
    """The preset ``name`` with the user's base model and audio encoder (a kind, or a hub id / local folder whose
    kind is read from its own config.json) and any other overrides applied (``None`` keeps the preset's)."""
    if base_model:
        overrides["base_model"] = base_model
    if audio_encoder in AUDIO_ENCODERS:
        overrides["audio_encoder"] = audio_encoder
    elif audio_encoder:
        overrides["audio_encoder"] = encoder_kind(audio_encoder)
        overrides["audio_encoder_path"] = audio_encoder
    return get_preset(name, **overrides)


def preset_for(config) -> ModelPreset:
    """The model preset a RunConfig's model section names, with its settings applied."""
    model = config.model
    return resolved_preset(model.preset, model.base_model, model.audio_encoder, fusion=model.fusion,
                           lora_rank=model.lora_rank, num_audio_tokens=model.num_audio_tokens,
                           xattn_layers=model.xattn_layers, xattn_gate=model.xattn_gate,
                           system_prompt=model.system_prompt, pad_to_square=model.pad_to_square)


def default_xattn_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer indices spread evenly over depth (32 layers, 3 -> 8/16/24; 40 -> 10/20/30; 4, 2 -> 1/3).

    An adapter at index i runs after decoder layer i (0-based)."""
    count = max(1, count)
    if count >= num_layers:
        return tuple(range(num_layers))
    return tuple(sorted({min(num_layers - 1, round((i + 1) * num_layers / (count + 1))) for i in range(count)}))
