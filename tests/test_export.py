"""Shareable adapters: `safe export` (the real command) -> SAFEModel.from_pretrained gives the run's model, logits
bit for bit, on the base the export names; another base is refused; the model card holds the metrics with their
sample counts and the training command; nothing reaches a hub offline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.local_run import COMMAND, STEP, make_run, save_base, save_clap

from safe.core.errors import SafeError
from safe.inference import load_run_model
from safe.models import SAFEModel

REPO = Path(__file__).resolve().parents[1]


def safe_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "safe", *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    run, base = make_run(root)
    done = safe_cli("export", "--run", run, "--out", root / "adapter")
    assert done.returncode == 0, done.stderr
    return root, run, base, root / "adapter"


def caption_batch(model):
    features = torch.randn(3, 20, model.audio_encoder.feature_dim, generator=torch.Generator().manual_seed(1))
    return model.builder.caption_batch(None, ["a dog barks", "red", "blue circle"]).with_audio(audio_features=features)


def test_export_folder_loads_back_with_identical_logits_on_the_base_it_names(exported):
    root, run, base, adapter = exported
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "metrics.json", "safe_config.json",
                                                         "trainable.safetensors", "training_config.json"]
    original, _ = load_run_model(run, device="cpu")
    loaded = SAFEModel.from_pretrained(adapter, device="cpu")          # no base given: the one the export names
    assert loaded.base_name == str(base)
    batch = caption_batch(original)
    with torch.no_grad():
        expected = original(batch, gate=1.0).logits
        assert torch.equal(loaded(batch, gate=1.0).logits, expected)
        assert not torch.equal(loaded(batch, gate=0.0).logits, expected)  # the adapter really changes the output
    weights = original.trainable_state_dict()
    assert all(torch.equal(weights[n], t) for n, t in loaded.trainable_state_dict().items())


def test_from_pretrained_refuses_a_base_the_adapter_was_not_trained_on(exported, tmp_path):
    _, _, _, adapter = exported
    other = save_base(tmp_path / "other-llava", seed=1)                    # same architecture, other weights
    with pytest.raises(SafeError, match="was trained on base model") as err:
        SAFEModel.from_pretrained(adapter, base=str(other), device="cpu")
    assert "\n" not in str(err.value)


def test_save_pretrained_round_trip_and_a_moved_base_is_one_sentence(exported, tmp_path):
    _, run, base, _ = exported
    model, _ = load_run_model(run, device="cpu")
    folder = model.save_pretrained(tmp_path / "mine")
    again = SAFEModel.from_pretrained(folder, base=str(base), device="cpu")
    batch = caption_batch(model)
    with torch.no_grad():
        assert torch.equal(again(batch).logits, model(batch).logits)
    saved = json.loads((folder / "safe_config.json").read_text())
    saved["preset"]["base_model"] = str(tmp_path / "gone")                 # the adapter travelled, its base did not
    (folder / "safe_config.json").write_text(json.dumps(saved))
    with pytest.raises(SafeError, match="trained with the base model at .*, which is not on this machine") as err:
        SAFEModel.from_pretrained(folder)
    assert "base='llava-hf/llava-1.5-7b-hf'" in str(err.value) and "\n" not in str(err.value)


def test_an_adapter_follows_its_audio_encoder_weights_not_their_folder(tmp_path):
    clap = save_clap(tmp_path / "clap", seed=0)
    run, _ = make_run(tmp_path / "trained", audio_encoder=str(clap))
    original, _ = load_run_model(run, device="cpu")
    batch = caption_batch(original)
    with torch.no_grad():
        expected = original(batch).logits
    adapter = tmp_path / "adapter"
    assert safe_cli("export", "--run", run, "--out", adapter).returncode == 0
    (tmp_path / "elsewhere").mkdir()
    moved = clap.rename(tmp_path / "elsewhere" / "clap-htsat-unfused")           # the adapter travels, not the path
    with pytest.raises(SafeError, match="trained with the audio encoder at .*, which is not on this machine") as err:
        SAFEModel.from_pretrained(adapter, device="cpu")
    assert "audio_encoder='laion/clap-htsat-unfused'" in str(err.value)
    loaded = SAFEModel.from_pretrained(adapter, audio_encoder=str(moved), device="cpu")   # same weights, new place
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, expected)
    other = save_clap(tmp_path / "other-clap", seed=1)
    with pytest.raises(SafeError, match="was trained with audio encoder"):
        SAFEModel.from_pretrained(adapter, audio_encoder=str(other), device="cpu")


def test_model_card_holds_the_metrics_their_sample_counts_and_the_command(exported):
    _, run, base, adapter = exported
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: safe\n")
    assert "base_model:" not in card.split("---")[1]                        # a local path is no hub base
    assert f"| base model | `{base}` |" in card and "| audio encoder | `tiny-conv:" in card
    assert "`soft_retention`" in card and f"{STEP} optimizer steps" in card
    assert "| CIDEr-D | 61.25 | 16 clips of audiocaps val |" in card
    assert "| VQA accuracy of the base (gate 0) | 90.00 | 30 questions of VQA v2 val |" in card
    assert "| distractor delta (with clip − without) | -3.33 | 30 questions of VQA v2 val |" in card
    assert COMMAND.replace("BASE", str(base)) in card
    assert json.loads((adapter / "training_config.json").read_text()) == json.loads((run / "config.json").read_text())


def test_a_safe_eval_file_of_the_checkpoint_is_in_the_card(exported, tmp_path):
    root, run, _, _ = exported
    checkpoint = next((run / "checkpoints").glob("step_*"))
    (run / "eval_audiocaps_test_step.json").write_text(json.dumps({
        "checkpoint": str(checkpoint), "dataset": "audiocaps", "split": "test", "vl_split": "val",
        "validation": {"audio_cider": 70.5, "audio_samples": 975, "vl_samples": 500, "vl_base_accuracy": 78.0}}))
    try:
        done = safe_cli("export", "--run", run, "--out", tmp_path / "with_test")
    finally:
        (run / "eval_audiocaps_test_step.json").unlink()
    assert done.returncode == 0, done.stderr
    card = (tmp_path / "with_test" / "README.md").read_text()
    assert "| CIDEr-D | 70.50 | 975 clips of audiocaps test |" in card


def test_offline_hub_use_is_one_sentence(exported, tmp_path):
    _, run, _, _ = exported
    with pytest.raises(SafeError, match="is not in the local Hugging Face cache and the hub is offline"):
        SAFEModel.from_pretrained("safe-tests-nobody/no-such-adapter")
    done = safe_cli("export", "--run", run, "--out", tmp_path / "out", "--push-to-hub", "me/my-adapter")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"`hf upload me/my-adapter {tmp_path / 'out'}`" in done.stderr
    assert (tmp_path / "out" / "trainable.safetensors").is_file()          # the export itself is kept


def test_push_to_hub_creates_the_repository_and_uploads_the_folder(exported, monkeypatch, tmp_path):
    import huggingface_hub

    from safe.export import push_to_hub

    _, _, _, adapter = exported
    calls = []

    class RecordingApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs["repo_id"], sorted(p.name for p in Path(kwargs["folder_path"])
                                                                      .iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert push_to_hub(adapter, "me/my-adapter", private=True) == "https://huggingface.co/me/my-adapter"
    assert calls[0] == ("create_repo", "me/my-adapter", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][:2] == ("upload_folder", "me/my-adapter") and "README.md" in calls[1][2]


def test_the_python_api_loads_an_export_and_answers_like_the_readme(exported, tmp_path, tone_writer):
    from PIL import Image

    from safe.inference import answer, caption_files, load_model

    _, run, _, adapter = exported
    model = load_model(adapter, device="cpu")
    clip, image = tmp_path / "clip.wav", tmp_path / "photo.png"
    tone_writer(clip, 1.0, 16000)
    Image.new("RGB", (60, 40), (200, 30, 30)).save(image)
    assert len(caption_files(model, [str(clip)], max_new_tokens=3)) == 1
    plain = answer(model, str(image), "what color", max_new_tokens=3)
    assert plain == answer(model, str(image), "what color", gate=0.0, max_new_tokens=3)   # no audio: the base
    assert load_model(run, device="cpu").trainable_config() == model.trainable_config()
