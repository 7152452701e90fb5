"""`safe models download` and the offline errors of model loading. Nothing reaches a hub: offline behaviour runs the
real command against a real (fake-filled) Hugging Face cache folder; the online path records the calls it makes to
huggingface_hub."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from safe.models.presets import get_preset
from safe.models.staging import OTHER_FORMATS, PICKLES, download_flags, hub_models, weight_filter

REPO = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, files=("config.json", "model.safetensors")) -> None:
    """A repository in the Hugging Face cache layout (refs/main -> snapshots/<commit>/...)."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in files:
        (snapshot / name).write_text("{}")


def safe_cli(cache: Path, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "safe", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=env)


def test_the_presets_hub_models():
    assert [(m.role, m.repo_id) for m in hub_models(get_preset("llava-1.5-7b"))] == [
        ("base model", "llava-hf/llava-1.5-7b-hf"), ("audio encoder", "laion/clap-htsat-unfused")]
    assert [m.repo_id for m in hub_models(get_preset("full", audio_encoder="whisper"))] == [
        "llava-hf/llava-1.5-13b-hf", "openai/whisper-small"]
    assert hub_models(get_preset("tiny")) == []
    local_base = get_preset("llava-1.5-7b", base_model="/models/llava")
    assert hub_models(local_base) == [hub_models(get_preset("llava-1.5-7b"))[1]]
    assert download_flags(get_preset("llava-1.5-7b", audio_encoder="whisper")) == [
        "--preset", "llava-1.5-7b", "--audio-encoder", "whisper"]


def test_weight_filter_keeps_one_torch_format():
    assert weight_filter(["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"]) == \
        OTHER_FORMATS + PICKLES
    assert "*.bin" not in weight_filter(["config.json", "pytorch_model.bin"])     # pickles only: they are the weights


def test_offline_download_prints_the_command_to_run_elsewhere(tmp_path):
    cache = tmp_path / "hf"
    cache_repo(cache, "laion/clap-htsat-unfused")
    done = safe_cli(cache, "models", "download", "--preset", "llava-1.5-7b", "--local-dir", "staged")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message.count("\n") == 0 and "the base model 'llava-hf/llava-1.5-7b-hf' is not in" in message
    assert "laion/clap-htsat-unfused' " not in message                            # that one is cached
    assert "run `safe models download --preset llava-1.5-7b --local-dir staged`" in message
    assert "hf download llava-hf/llava-1.5-7b-hf --local-dir staged/llava-1.5-7b-hf" in message
    assert "--base-model staged/llava-1.5-7b-hf --audio-encoder staged/clap-htsat-unfused." in message
    cache_repo(cache, "llava-hf/llava-1.5-7b-hf")
    done = safe_cli(cache, "models", "download", "--preset", "llava-1.5-7b")
    assert done.returncode == 0 and "already in the Hugging Face cache" in done.stdout, done.stderr


def test_a_cached_config_without_weights_is_missing(tmp_path):
    from safe.models import staging

    cache = tmp_path / "hf"
    cache_repo(cache, "llava-hf/llava-1.5-7b-hf", files=("config.json",))
    done = safe_cli(cache, "models", "download", "--preset", "llava-1.5-7b")
    assert done.returncode == 2 and "'llava-hf/llava-1.5-7b-hf' and the audio encoder" in done.stderr
    assert staging.cached_snapshot("safe-tests-nobody/nothing") is None


def test_training_offline_names_every_missing_model_and_the_download(tmp_path, toy_world):
    done = safe_cli(tmp_path / "empty-cache", "train", "--model-config", "llava-1.5-7b", "--data-root", toy_world,
                    "--output-root", tmp_path / "runs", "--variant", "no_retention")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = done.stderr.strip()
    assert message == ("error: The base model 'llava-hf/llava-1.5-7b-hf' and the audio encoder "
                       "'laion/clap-htsat-unfused' are not in the local Hugging Face cache and the hub is offline "
                       "(HF_HUB_OFFLINE=1); where there is network access run `safe models download --preset "
                       "llava-1.5-7b` (it fills the cache; add --local-dir DIR for folders to copy here), or pass "
                       "local copies with --base-model PATH --audio-encoder PATH.")


def test_download_fetches_the_base_and_the_encoder_into_the_local_dir(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from safe.cli import main

    calls = []

    class Listing:
        def list_repo_files(self, repo_id):
            return ["config.json", "model.safetensors", "pytorch_model.bin"]

    def snapshot_download(repo_id, local_dir=None, ignore_patterns=None):
        calls.append((repo_id, local_dir, ignore_patterns))
        Path(local_dir).mkdir(parents=True)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "HfApi", Listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert main(["models", "download", "--preset", "llava-1.5-7b", "--audio-encoder", "whisper",
                 "--local-dir", str(tmp_path / "m")]) == 0
    assert calls == [("llava-hf/llava-1.5-7b-hf", tmp_path / "m" / "llava-1.5-7b-hf", OTHER_FORMATS + PICKLES),
                     ("openai/whisper-small", tmp_path / "m" / "whisper-small", OTHER_FORMATS + PICKLES)]
    out = capsys.readouterr().out
    assert (f"Train with: safe train --model-config llava-1.5-7b --base-model {tmp_path / 'm' / 'llava-1.5-7b-hf'} "
            f"--audio-encoder {tmp_path / 'm' / 'whisper-small'}") in out


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_the_tiny_preset_downloads_nothing(tmp_path, preset):
    done = safe_cli(tmp_path, "models", "download", "--preset", preset)
    assert done.returncode == 0 and "nothing to download" in done.stdout
