"""What must be known about each audio encoder kind before its weights load, in one place.

The data layer resamples to ``sample_rate(...)`` before any model exists (a dry run, ``safe cache-features``, the
loader workers). A checkpoint named by hub id or folder is told apart by its own ``config.json`` (``model_type``),
never by a word in its name; only the hub families listed here are known without reading their config.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from safe.core.errors import SafeError


@dataclass(frozen=True)
class EncoderSpec:
    kind: str
    sample_rate: int                   # Hz: what the encoder's feature extractor takes
    default_checkpoint: str | None     # hub id used when the preset names none (tiny: built from its seed)
    model_types: tuple[str, ...]       # config.json "model_type" values of this kind's checkpoints
    known_hub_prefixes: tuple[str, ...] = ()   # hub families whose kind is known without fetching their config


ENCODERS: dict[str, EncoderSpec] = {
    "clap": EncoderSpec("clap", 48_000, "laion/clap-htsat-unfused", ("clap",), ("laion/clap-", "laion/larger_clap")),
    "whisper": EncoderSpec("whisper", 16_000, "openai/whisper-small", ("whisper",), ("openai/whisper-",)),
    "tiny": EncoderSpec("tiny", 16_000, None, ()),
}


def encoder_spec(kind: str) -> EncoderSpec:
    if kind not in ENCODERS:
        raise SafeError(f"Unknown audio encoder {kind!r}; use one of {', '.join(ENCODERS)}, or a hub id or a "
                        "local folder.")
    return ENCODERS[kind]


def sample_rate(kind: str, checkpoint: str | None = None) -> int:
    """The rate the data layer must produce for this encoder, before any weights load: a local checkpoint folder's
    own feature-extractor setting (``preprocessor_config.json``; the tiny encoder's ``config.json``), else the
    kind's. The loaded encoder reads the same value from its extractor, and the trainer checks the two agree."""
    spec = encoder_spec(kind)
    folder = Path(checkpoint).expanduser() if checkpoint else None
    if folder is not None and folder.is_dir():
        settings = folder / ("config.json" if kind == "tiny" else "preprocessor_config.json")
        if settings.is_file():
            saved = json.loads(settings.read_text())
            return int(saved.get("sample_rate" if kind == "tiny" else "sampling_rate", spec.sample_rate))
    return spec.sample_rate


@functools.lru_cache(maxsize=64)
def encoder_kind(source: str) -> str:
    """``clap``/``whisper``/``tiny`` for a kind name, a local checkpoint folder or a hub id."""
    if source in ENCODERS:
        return source
    folder = Path(source).expanduser()
    if folder.is_dir():
        model_type = _model_type(folder / "config.json", source)
        if model_type is None and (folder / "model.safetensors").is_file():
            return "tiny"   # TinyConvEncoder.save writes its own constructor settings, no model_type
        return _kind_of_model_type(model_type, source)
    for spec in ENCODERS.values():
        if source.startswith(spec.known_hub_prefixes):
            return spec.kind
    return _kind_of_model_type(_hub_model_type(source), source)


def _model_type(config: Path, source: str) -> str | None:
    if not config.is_file():
        raise SafeError(f"The audio encoder folder {source} has no config.json; pass a Hugging Face checkpoint folder "
                        f"(CLAP or Whisper) or one of {', '.join(ENCODERS)}.")
    return json.loads(config.read_text()).get("model_type")


def _hub_model_type(repo_id: str) -> str | None:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(repo_id).model_type
    except Exception as exc:  # offline without a cached copy, a missing repository, no access
        raise SafeError(f"Cannot tell which kind of audio encoder '{repo_id}' is: its config.json could not be read "
                        f"({type(exc).__name__}). Download it once (`safe models download`) and pass the local "
                        "folder, or check the name.") from None


def _kind_of_model_type(model_type: str | None, source: str) -> str:
    for spec in ENCODERS.values():
        if model_type in spec.model_types:
            return spec.kind
    raise SafeError(f"The audio encoder {source} is a {model_type!r} model; SAFE reads CLAP and Whisper checkpoints "
                    f"({', '.join(t for s in ENCODERS.values() for t in s.model_types)}).")
