"""The model configuration (``ModelConfig``): a run's model section, and the presets (``--model-config``) as data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from safe.core.errors import SafeError
from safe.core.settings import OFF, count_or, setting
from safe.models.encoder_registry import ENCODERS, encoder_kind
from safe.models.prompts import STYLES

AUDIO_ENCODERS = tuple(ENCODERS)
FUSIONS = ("xattn", "prefix")
THE_PRESETS = "the preset's"


@dataclass
class ModelConfig:
    """A run's model: its preset and every setting, so config.json records the model that was built. A preset is a
    ModelConfig (``PRESETS``; ``ModelConfig()`` is the tiny one, the embedded default) and a run's model is its
    preset with the settings the user gave applied (``preset_with``). Left None by design, and resolved against
    the loaded model: the encoder checkpoint (its kind's default), the xattn layers (spread over depth), the xattn
    width (min(hidden, 1024)) and LoRA's alpha (2 x rank). Each field's flag comes from its metadata."""

    preset: str = setting("tiny", "model preset: tiny, llava-1.5-7b, llava-1.5-13b (aliases: demo, full)",
                          names=("--model-config", "--preset"), dest="model_config",
                          default_text="tiny on a toy world, llava-1.5-7b on other data")
    base_model: str = setting("tiny", "hub id or local path of the base LLaVA (tiny: the toy base, built and cached "
                              "on first use)", default_text=THE_PRESETS)
    audio_encoder: str = setting("tiny", "clap, whisper, tiny, or a hub id / local path of a CLAP or Whisper "
                                 "checkpoint", default_text="the preset's: clap, tiny")
    audio_encoder_path: str | None = setting(None, "the audio encoder's checkpoint (hub id or local folder)",
                                             default_text="the kind's default")
    audio_features: str = setting("patch", "CLAP output: the patch sequence or the pooled vector",
                                  choices=("patch", "pooled"))
    clip_seconds: float = setting(4.0, "audio window in seconds (longer clips train on seeded windows)",
                                  default_text="the preset's: 10, tiny 4")
    num_audio_tokens: int = setting(8, "audio tokens per clip", default_text="the preset's: 16, tiny 8")
    pre_pool_steps: int | None = setting(None, "the projector's fixed pre-pool grid, which the feature cache stores "
                                         "(steps, or off)", default_text="the preset's: 32, tiny off",
                                         type=count_or(OFF))
    fusion: str = setting("xattn", "how audio reaches the LLM: gated cross-attention adapters or prefix tokens",
                          choices=FUSIONS)
    xattn_layers: list[int] | None = setting(None, "decoder layers that get an xattn adapter",
                                             default_text="spread over depth")
    num_xattn_layers: int = setting(2, "xattn adapters spread over depth when --xattn-layers is not given",
                                    default_text="the preset's: 3, tiny 2")
    xattn_dim: int | None = setting(None, "inner width of the cross-attention", default_text="min(hidden, 1024)")
    xattn_heads: int = setting(4, "heads of the cross-attention", default_text="the preset's: 8, tiny 4")
    xattn_gate: str = setting("layer", "xattn gate: one scalar per layer (layer) or a per-token gate on the query "
                              "state (token)", choices=("layer", "token"))
    lora_rank: int = setting(0, "LoRA rank on the LLM's projections, active on the SAFE path only (0 = off)")
    lora_alpha: float | None = setting(None, "LoRA's alpha", default_text="2 x rank")
    lora_targets: list[str] = setting(["q_proj", "v_proj"], "the LLM projections LoRA adapts",
                                      default_text="q_proj v_proj")
    lora_dropout: float = setting(0.0, "LoRA's dropout")
    tiny_seed: int = setting(0, "tiny preset: seed of its toy world, base model and audio encoder")
    prompt_style: str = setting("tiny", "prompt format: llava_v1 (LLaVA-1.5's) or tiny (the toy base's)",
                                choices=tuple(STYLES), default_text="the preset's: llava_v1, tiny")
    system_prompt: bool = setting(True, "llava_v1 prompts: LLaVA-1.5's vicuna_v1 system message before every "
                                  "prompt")
    pad_to_square: bool = setting(False, "pad images to square with the mean colour, as LLaVA-1.5 (off = centre "
                                  "crop)", default_text="the preset's: on for llava-1.5")

    def validate(self) -> "ModelConfig":
        """A normalised copy (the preset's canonical name, plain lists), or one sentence on the first bad value."""
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SafeError(f"--{name.replace('_', '-')} must be {' or '.join(allowed)}, not "
                                f"{getattr(self, name)!r}.")
        for name in ("num_audio_tokens", "num_xattn_layers", "xattn_heads", "pre_pool_steps", "xattn_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SafeError(f"--{name.replace('_', '-')} must be at least 1, not {value}.")
        if self.lora_rank < 0:
            raise SafeError("--lora-rank must be 0 (off) or positive.")
        return dataclasses.replace(
            self, preset=canonical_preset(self.preset), lora_targets=list(self.lora_targets),
            xattn_layers=None if self.xattn_layers is None else [int(i) for i in self.xattn_layers])

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with ``changes`` applied."""
        unknown = set(changes) - set(FIELDS)
        if unknown:
            raise SafeError(f"Unknown model option(s) {sorted(unknown)}; see `safe train --help`.")
        return dataclasses.replace(self, **changes).validate()

    @property
    def encoder_path(self) -> str | None:
        """The audio encoder's checkpoint: the one given, else its kind's default (None for the tiny encoder)."""
        return self.audio_encoder_path or ENCODERS[self.audio_encoder].default_checkpoint


FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# The allowed values of each setting that has a fixed set: the flags' choices, and the encoder kinds (the flag also
# takes a hub id or a folder, which `preset_with` turns into its kind).
CHOICES = {"audio_encoder": AUDIO_ENCODERS, **{f.name: f.metadata["flag"]["choices"] for f in dataclasses.fields(
    ModelConfig) if "choices" in f.metadata["flag"]}}
# Settings whose None means something (see ModelConfig); a None anywhere else means "not given".
NONE_MEANS_SOMETHING = {f.name for f in dataclasses.fields(ModelConfig) if f.default is None}

LLAVA_1_5: dict[str, Any] = dict(
    audio_encoder="clap", clip_seconds=10.0, num_audio_tokens=16, pre_pool_steps=32, num_xattn_layers=3,
    xattn_heads=8, prompt_style="llava_v1", pad_to_square=True)
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "llava-1.5-7b": ModelConfig(preset="llava-1.5-7b", base_model="llava-hf/llava-1.5-7b-hf", **LLAVA_1_5),
    "llava-1.5-13b": ModelConfig(preset="llava-1.5-13b", base_model="llava-hf/llava-1.5-13b-hf", **LLAVA_1_5),
}
ALIASES = {"full": "llava-1.5-13b", "demo": "tiny"}


def preset_names() -> list[str]:
    return list(PRESETS) + list(ALIASES)


def canonical_preset(name: str) -> str:
    """The preset's canonical name; the user's earlier names `full` and `demo` keep working."""
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise SafeError(f"Unknown model config {name!r}; use one of {', '.join(preset_names())}.")
    return key


def preset_with(name: str, settings: dict[str, Any]) -> ModelConfig:
    """The preset ``name`` with ``settings`` applied. An audio encoder given as a hub id or a local folder gives its
    kind (read from its own config.json) and its checkpoint; a None where None means nothing is "not given"."""
    given = {k: v for k, v in settings.items() if k != "preset" and (v is not None or k in NONE_MEANS_SOMETHING)}
    encoder = given.get("audio_encoder")
    if encoder is not None and encoder not in AUDIO_ENCODERS:
        given["audio_encoder"] = encoder_kind(encoder)
        given.setdefault("audio_encoder_path", encoder)
    return PRESETS[canonical_preset(name)].replace(**given)


def get_preset(name: str, **settings) -> ModelConfig:
    """The preset ``name`` (or an alias: ``full`` = llava-1.5-13b, ``demo`` = tiny) with ``settings`` applied;
    ``None`` ones are ignored, as flags left unset."""
    return preset_with(name, {k: v for k, v in settings.items() if v is not None})


def default_xattn_layers(num_layers: int, count: int) -> tuple[int, ...]:
    """``count`` layer indices spread evenly over depth (32 layers, 3 -> 8/16/24; 40 -> 10/20/30; 4, 2 -> 1/3).

    An adapter at index i runs after decoder layer i (0-based)."""
    count = max(1, count)
    if count >= num_layers:
        return tuple(range(num_layers))
    return tuple(sorted({min(num_layers - 1, round((i + 1) * num_layers / (count + 1))) for i in range(count)}))
