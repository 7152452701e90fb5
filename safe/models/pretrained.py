"""Shareable adapters: a SAFE model's trained part as a folder (or a hub repository) that loads onto its base anywhere.

The folder holds what `SAFEModel.save_trainable` writes, the same two files as a checkpoint: `trainable.safetensors`
(projector, adapters, gates, LoRA) and `safe_config.json` (the preset, the base's name and fingerprint, the audio
encoder). `safe export` adds a model card and the run's configuration and metrics. `from_pretrained` rebuilds the
model the folder names (or onto the base given), then loads the weights; the base fingerprint refuses a base the
adapter was not trained on, whatever its name.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from safe.core.errors import SafeError
from safe.models.encoder_registry import ENCODERS
from safe.models.loading import _offline, looks_like_path
from safe.models.presets import PRESETS, ModelConfig, preset_with
from safe.models.safe_model import CONFIG_FILE, TRAINABLE_FILE

CARD_FILE = "README.md"


def adapter_folder(source: str | Path, revision: str | None = None) -> Path:
    """A local export folder, or the snapshot of a hub repository holding one (downloaded or from the cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not (path / TRAINABLE_FILE).is_file():
            raise SafeError(f"{path} holds no SAFE adapter ({CONFIG_FILE} + {TRAINABLE_FILE}); pass a folder written "
                            "by `safe export` or SAFEModel.save_pretrained.")
        return path
    if looks_like_path(str(source)):
        raise SafeError(f"The adapter folder {source} does not exist; pass a folder written by `safe export` or a "
                        "hub id such as user/safe-adapter.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision,
                                      allow_patterns=[CONFIG_FILE, TRAINABLE_FILE, CARD_FILE]))
    except Exception as exc:  # offline without a cached copy, a missing repository, no access
        where = "is not in the local Hugging Face cache and the hub is offline" if _offline() \
            else f"could not be downloaded from the Hugging Face hub ({type(exc).__name__})"
        raise SafeError(f"The SAFE adapter '{source}' {where}; download it once with network access "
                        f"(`hf download {source}`) or pass a local export folder.") from None


def saved_preset(saved: dict) -> ModelConfig:
    """The model an adapter's safe_config.json records: every setting (adapters saved before presets were
    ModelConfigs name the preset under "name")."""
    values = dict(saved["preset"])
    name = values.pop("preset", None) or values.pop("name")
    return preset_with(name, values)


def _check_reachable(preset: ModelConfig, folder: Path, base_given: bool, encoder_given: bool) -> None:
    """A local folder the adapter names but this machine lacks: say which keyword brings it back."""
    hub = PRESETS.get(preset.preset)
    checks = [("base model", preset.base_model, "base", hub.base_model if hub else None, base_given),
              ("audio encoder", preset.audio_encoder_path, "audio_encoder",
               ENCODERS[preset.audio_encoder].default_checkpoint, encoder_given)]
    for what, path, keyword, hub_copy, given in checks:
        if given or not path or path == "tiny" or not looks_like_path(path) or Path(path).expanduser().exists():
            continue
        example = f"{keyword}='{hub_copy}' (the hub copy)" if hub_copy and hub_copy != "tiny" else f"{keyword}='PATH'"
        raise SafeError(f"The adapter in {folder} was trained with the {what} at {path}, which is not on this "
                        f"machine; pass it from where it is here, e.g. from_pretrained('{folder}', {example}).")


def from_pretrained(source: str | Path, base: str | None = None, audio_encoder: str | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                    revision: str | None = None):
    """The SAFE model of an export folder or hub id, on the base it names (or ``base``: a hub id or local folder)."""
    from safe.models.factory import build_safe_model

    folder = adapter_folder(source, revision)
    saved = json.loads((folder / CONFIG_FILE).read_text())
    preset = saved_preset(saved)
    _check_reachable(preset, folder, base is not None, audio_encoder is not None)
    if base is not None:
        preset = preset.replace(base_model=str(base))
    if audio_encoder is not None:
        preset = preset.replace(audio_encoder_path=str(audio_encoder))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = build_safe_model(preset, device=device, dtype=dtype)
    model.load_trainable(folder)
    return model.eval()
