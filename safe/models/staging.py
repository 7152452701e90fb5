"""A preset's models on the Hugging Face hub: which they are, whether they are here, and fetching them.

`safe models download --preset llava-1.5-7b [--audio-encoder whisper] [--local-dir DIR]` fetches the base LLaVA and
the preset's audio encoder with huggingface_hub's snapshot_download, which resumes an interrupted download where it
stopped. Without --local-dir the files go to the Hugging Face cache, where the hub ids then work offline
(HF_HUB_OFFLINE=1); with it, each model goes to DIR/<name>, to be passed as --base-model / --audio-encoder. Offline,
the command says what to run on a machine with network access. Model loading calls `require_models` first, so one
error names every model that is missing, with the command that fetches them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from safe.core.errors import SafeError
from safe.models.encoder_registry import ENCODERS
from safe.models.loading import _offline, looks_like_path
from safe.models.presets import PRESETS, ModelConfig

# Weight formats transformers does not load with torch; PyTorch pickles too when the repository has safetensors.
OTHER_FORMATS = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "onnx/*", "*.tflite", "*.mlmodel", "coreml/*",
                 "flax_model*", "tf_model*", "rust_model*"]
PICKLES = ["*.bin", "*.pt", "*.pth", "*.ckpt"]


@dataclass(frozen=True)
class HubModel:
    role: str       # "base model" or "audio encoder"
    repo_id: str
    flag: str       # the flag that takes a local copy instead

    @property
    def folder_name(self) -> str:
        return self.repo_id.split("/")[-1]


def hub_models(preset: ModelConfig) -> list[HubModel]:
    """The hub models ``preset`` loads (local folders and the tiny preset's built models are not hub models)."""
    found = []
    if preset.base_model != "tiny" and not looks_like_path(preset.base_model):
        found.append(HubModel("base model", preset.base_model, "--base-model"))
    encoder = preset.encoder_path
    if preset.audio_encoder != "tiny" and encoder and not looks_like_path(encoder):
        found.append(HubModel("audio encoder", encoder, "--audio-encoder"))
    return found


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id`` when it holds a config and weights, else None (no network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises its own errors for that)
        return None
    weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    return folder if (folder / "config.json").is_file() and weights else None


def download_flags(preset: ModelConfig) -> list[str]:
    """`safe models download` flags that select ``preset``'s models (only what differs from the preset's own)."""
    flags = ["--preset", preset.preset]
    own = PRESETS.get(preset.preset)
    if own is not None and preset.base_model != own.base_model:
        flags += ["--base-model", preset.base_model]
    if own is not None and preset.encoder_path != own.encoder_path and preset.encoder_path:
        defaults = {spec.default_checkpoint: kind for kind, spec in ENCODERS.items()}
        flags += ["--audio-encoder", defaults.get(preset.encoder_path, preset.encoder_path)]
    return flags


def _names(models: list[HubModel]) -> str:
    named = [f"the {m.role} '{m.repo_id}'" for m in models]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]


def require_models(preset: ModelConfig, roles: tuple[str, ...] = ("base model", "audio encoder")) -> None:
    """Offline, refuse in one sentence naming every hub model of ``preset`` that is not cached, and how to get them."""
    if not _offline():
        return  # online, transformers fetches what is missing
    missing = [m for m in hub_models(preset) if m.role in roles and cached_snapshot(m.repo_id) is None]
    if not missing:
        return
    command = "safe models download " + " ".join(download_flags(preset))
    local = " ".join(f"{m.flag} PATH" for m in missing)
    names = _names(missing)
    raise SafeError(f"{names[0].upper()}{names[1:]} {'is' if len(missing) == 1 else 'are'} not "
                    "in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1); where there is network "
                    f"access run `{command}` (it fills the cache; add --local-dir DIR for folders to copy here), or "
                    f"pass local copies with {local}.")


def weight_filter(files: list[str]) -> list[str]:
    """ignore_patterns for a repository listing: other frameworks' weights, and PyTorch pickles that duplicate
    safetensors (a repository with pickles only keeps them)."""
    has_safetensors = any(name.endswith(".safetensors") for name in files)
    return OTHER_FORMATS + (PICKLES if has_safetensors else [])


def download(models: list[HubModel], local_dir: Path | None = None) -> dict[str, Path]:
    """Fetch each model (resumable); returns repo id -> the folder it is in."""
    import huggingface_hub
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # this command is the download: its bars are the point
    api = huggingface_hub.HfApi()
    done = {}
    for model in models:
        print(f"{model.role}: {model.repo_id}", flush=True)
        try:
            ignore = weight_filter(api.list_repo_files(model.repo_id))
            target = local_dir / model.folder_name if local_dir is not None else None
            done[model.repo_id] = Path(huggingface_hub.snapshot_download(model.repo_id, local_dir=target,
                                                                         ignore_patterns=ignore))
        except Exception as exc:
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise SafeError(f"Downloading {model.repo_id} stopped ({detail}); run the same command again to resume "
                            "(log in with `hf auth login` if the repository needs it).") from None
    return done


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", "--model-config", dest="preset", required=True,
                        help="model preset: llava-1.5-7b, llava-1.5-13b (aliases: full); tiny needs no download")
    parser.add_argument("--audio-encoder", help="clap, whisper, or a hub id (default: the preset's, CLAP)")
    parser.add_argument("--base-model", help="a hub id to fetch instead of the preset's base")
    parser.add_argument("--local-dir", type=Path, help="put each model in DIR/<name> instead of the Hugging Face cache")


def selected_preset(args: argparse.Namespace) -> ModelConfig:
    from safe.models.presets import get_preset

    return get_preset(args.preset, base_model=args.base_model, audio_encoder=args.audio_encoder)


def _offline_message(preset: ModelConfig, missing: list[HubModel], local_dir: Path | None) -> str:
    where = local_dir or Path("models")
    command = " ".join(["safe models download", *download_flags(preset), "--local-dir", str(where)])
    hf = " && ".join(f"hf download {m.repo_id} --local-dir {where / m.folder_name}" for m in hub_models(preset))
    flags = " ".join(f"{m.flag} {where / m.folder_name}" for m in hub_models(preset))
    return (f"The hub is offline here (HF_HUB_OFFLINE=1) and {_names(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not in the local Hugging Face cache; on a machine with network "
            f"access run `{command}` (or `{hf}`), copy {where}/ here and train with --model-config {preset.preset} "
            f"{flags}.")


def run(args: argparse.Namespace) -> int:
    preset = selected_preset(args)
    models = hub_models(preset)
    if not models:
        print(f"The {preset.preset} preset loads no hub model (the tiny base is built and cached on first use); "
              "nothing to download.")
        return 0
    if _offline():
        missing = [m for m in models if cached_snapshot(m.repo_id) is None]
        if missing:
            raise SafeError(_offline_message(preset, missing, args.local_dir))
        print("Every model is already in the Hugging Face cache: " + ", ".join(m.repo_id for m in models) + ".")
        return 0
    folders = download(models, args.local_dir)
    for model in models:
        print(f"{model.role}: {model.repo_id} in {folders[model.repo_id]}")
    if args.local_dir is not None:
        flags = " ".join(f"{m.flag} {folders[m.repo_id]}" for m in models)
        print(f"Train with: safe train --model-config {preset.preset} {flags} ...")
    else:
        print(f"Train with: safe train --model-config {preset.preset} ... (offline too: HF_HUB_OFFLINE=1)")
    return 0
