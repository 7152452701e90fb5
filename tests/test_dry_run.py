"""`safe train --dry-run`: the model on the meta device (its figures are count_parameters'), the activation estimate
against what autograd really saves, steps from the staged data, the epoch-time estimate from a GPU measurement, the
data check; no run folder, no download (the real command, offline, with an empty Hugging Face cache)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from safe.models.audio_encoders import TinyConvEncoder
from safe.models.batching import SafeBatch
from safe.models.checkpointing import enable_activation_checkpointing
from safe.models.factory import count_parameters
from safe.models.memory import activation_bytes, recompute_bytes_per_token, step_shapes
from safe.models.presets import get_preset
from safe.models.prompts import IGNORE_INDEX
from safe.models.safe_model import SAFEModel
from safe.training.config import build_config
from safe.training.data import load_run_data
from safe.training.dry_run import data_figures, data_report, model_figures
from safe.training.model_factory import audio_settings

REPO = Path(__file__).resolve().parents[1]


def small_model(layers=4, hidden=128, intermediate=256, vocab=500, **preset) -> SAFEModel:
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1)
    torch.manual_seed(0)
    settings = {"num_audio_tokens": 8, "num_xattn_layers": 2, "xattn_heads": 4, **preset}
    model = SAFEModel(LlavaForConditionalGeneration(config).eval(), None, TinyConvEncoder(clip_seconds=1.0),
                      get_preset("llava-1.5-7b", base_model="test", audio_encoder="tiny", **settings))
    with torch.no_grad():
        for param in model.trainable_parameters():
            if param.numel() == 1:
                param.fill_(0.3)  # open the gates: the adapters' own activations are then kept too
    return model


def saved_bytes(model: SAFEModel, batch: int, length: int) -> int:
    """Bytes of the activations autograd keeps for the backward of one caption micro-batch (weights excluded)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    vocab = model.base.config.text_config.vocab_size
    ids = torch.randint(3, vocab - 2, (batch, length), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -10:] = ids[:, -10:]
    inputs = SafeBatch(kind="audio", input_ids=ids, attention_mask=torch.ones_like(ids),
                       splice_pos=torch.full((batch,), 3), labels=labels,
                       audio_features=torch.randn(batch, 13, model.audio_encoder.feature_dim))
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = max(kept.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs, gate=1.0, label_smoothing=0.1)
    return sum(kept.values())


@pytest.mark.parametrize("settings", [
    dict(), dict(layers=8), dict(hidden=256), dict(intermediate=512), dict(vocab=2000), dict(xattn_dim=64),
    dict(fusion="prefix"), dict(lora_rank=4), dict(layers=6, num_xattn_layers=3)], ids=str)
def test_activation_estimate_matches_what_autograd_saves(settings):
    preset = {k: v for k, v in settings.items() if k not in ("layers", "hidden", "intermediate", "vocab")}
    model = small_model(**{k: v for k, v in settings.items() if k not in preset}, **preset)
    measured = saved_bytes(model, batch=4, length=64)
    estimate = activation_bytes(step_shapes(model), batch=4, seq_len=64, act_bytes=4)   # fp32 on CPU
    assert abs(estimate / measured - 1) < 0.1, (estimate, measured)


def test_activation_estimate_with_checkpointing():
    model = small_model(layers=8)
    plain = saved_bytes(model, 4, 64)
    enable_activation_checkpointing(model)
    measured = saved_bytes(model, 4, 64)
    shapes = step_shapes(model)
    estimate = activation_bytes(shapes, 4, 64, act_bytes=4, checkpointing=True)
    recomputed = 4 * 64 * recompute_bytes_per_token(shapes, 4)   # rebuilt in the backward: no saved tensor shows it
    assert measured < 0.5 * plain
    assert abs((estimate - recomputed) / measured - 1) < 0.1, (estimate, recomputed, measured)


def offline_env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hf-cache")}


def test_dry_run_figures_are_count_parameters_on_meta_and_steps_from_the_data(toy_world, tmp_path):
    args = ["train", "--dry-run", "--model-config", "llava-1.5-7b", "--data-root", str(toy_world),
            "--output-root", str(tmp_path / "runs"), "--variant", "soft_retention", "--train-batch-size", "4",
            "--gradient-accumulation-steps", "2"]
    done = subprocess.run([sys.executable, "-m", "safe", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env=offline_env(tmp_path))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    counts = count_parameters(get_preset("llava-1.5-7b"))
    assert f"trainable      {counts['trainable'] / 1e6:.2f} M (projector {counts['projector'] / 1e6:.2f} M" in out
    assert f"frozen         {counts['frozen'] / 1e9:.2f} B" in out
    assert f"frozen weights, bf16                 {2 * counts['frozen'] / 2**30:.1f} GiB" in out
    assert "known architecture (its config is not cached)" in out and "(not downloaded yet)" in out
    rows = len((toy_world / "audiocaps" / "audiocaps_train.jsonl").read_text().splitlines())
    assert f"steps per epoch     {math.ceil(math.ceil(rows / 4) / 2)}" in out
    assert "576 image tokens" in out and "2 a step" in out                          # VL micro-batches = accumulation
    assert out.rstrip().endswith("Data check passed; nothing was trained. Drop --dry-run to train.")
    assert not (tmp_path / "runs").exists()

    config = build_config(cli_values={"model_config": "llava-1.5-7b", "lora_rank": 8, "data_root": str(toy_world)})
    figures = model_figures(config)
    assert figures["counts"] == count_parameters(get_preset("llava-1.5-7b", lora_rank=8))
    assert figures["weights_bf16"] == 2 * figures["counts"]["frozen"]


def test_epoch_time_comes_from_a_gpu_measurement(toy_world, tmp_path):
    config = build_config(cli_values={"model_config": "llava-1.5-7b", "data_root": str(toy_world), "max_steps": 40})
    figures = model_figures(config)
    data = load_run_data(config, *audio_settings(config))
    assert "epoch_seconds" not in data_figures(config, figures, data, results_dir=tmp_path)   # nothing measured
    (tmp_path / "gpu_check.json").write_text(json.dumps({
        "benchmark": "gpu_check", "device": "NVIDIA H200", "shape": "llava-1.5-7b",
        "results": [{"fusion": "prefix", "tokens_per_s": 1.0, "n_active": 1},
                    {"fusion": "xattn", "activation_checkpointing": False, "tokens_per_s": 20000.0,
                     "n_active": figures["active"] // 2}]}))
    figures_data = data_figures(config, figures, data, world_size=2, results_dir=tmp_path)
    speed = 20000.0 * (figures["active"] // 2) / figures["active"]                 # scaled to this model's size
    step = (figures_data["caption_tokens"] + 1.5 * figures_data["vl_tokens"]) / speed
    assert figures_data["step_seconds"] == pytest.approx(step)
    assert figures_data["epoch_seconds"] == pytest.approx(step * figures_data["steps_per_epoch"])
    assert figures_data["run_seconds"] == pytest.approx(step * 40)
    assert figures_data["steps_per_epoch"] == math.ceil(len(data.audio_train) / (8 * 2))
    assert "measured on NVIDIA H200" in data_report(config, figures, figures_data)


def test_dry_run_checks_the_data_after_the_model_figures(toy_world, tmp_path):
    import shutil

    broken = tmp_path / "world"
    shutil.copytree(toy_world, broken)
    with open(broken / "audiocaps" / "audiocaps_val.jsonl", "a") as handle:
        handle.write("{not json\n")
    done = subprocess.run([sys.executable, "-m", "safe", "train", "--dry-run", "--data-root", str(broken)],
                          capture_output=True, text=True, cwd=REPO, timeout=600, env=offline_env(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Parameters" in done.stdout and "Data check passed" not in done.stdout
    assert "audiocaps_val.jsonl" in done.stderr and done.stderr.strip().count("\n") == 0
