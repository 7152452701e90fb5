"""The embedded default's tiny base: built once, cached atomically, reused; good enough at toy VQA."""

from __future__ import annotations

import json
import time

import pytest
import torch

from safe.models.factory import build_safe_model
from safe.models.presets import get_preset
from safe.models.tiny_base import cache_key, ensure_tiny_base

QUICK = {"world_size": "small", "vision_steps": 10, "align_steps": 10, "llm_steps": 10}


@pytest.mark.slow
def test_tiny_base_is_built_once_then_loaded_from_cache(tmp_path):
    started = time.perf_counter()
    first = ensure_tiny_base(seed=0, cache_dir=tmp_path, overrides=QUICK, log=lambda *_: None)
    build_seconds = time.perf_counter() - started
    assert first.name == cache_key(0, QUICK) and first.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.name]            # no temporary folder left behind
    for name in ("config.json", "model.safetensors", "tiny_base.json", "processor_config.json",
                 "audio_encoder/config.json", "audio_encoder/model.safetensors"):
        assert (first / name).is_file(), name
    info = json.loads((first / "tiny_base.json").read_text())
    assert info["seed"] == 0 and info["audio_encoder"]["seed"] == 0

    started = time.perf_counter()
    again = ensure_tiny_base(seed=0, cache_dir=tmp_path, overrides=QUICK, log=lambda *_: None)
    assert again == first and time.perf_counter() - started < min(1.0, build_seconds / 5)
    assert cache_key(1, QUICK) != cache_key(0, QUICK) != cache_key(0)

    # The cached entry loads through the ordinary local-path code path, audio encoder included.
    preset = get_preset("tiny", base_model=str(first), audio_encoder_path=str(first / "audio_encoder"))
    model = build_safe_model(preset)
    waves = torch.randn(2, model.audio_encoder.clip_samples) * 0.1
    answers = model.generate(model.builder.caption_batch(waves), max_new_tokens=4)
    assert len(answers) == 2


@pytest.mark.slow
def test_default_tiny_base_answers_toy_vqa():
    """The real default build (medium toy world, the same cache entry every other test uses): >= 0.85 official
    VQA accuracy on its val split."""
    path = ensure_tiny_base(seed=0)
    info = json.loads((path / "tiny_base.json").read_text())
    assert info["vqa_val_questions"] >= 300
    assert info["vqa_val_accuracy"] >= 0.85, info
