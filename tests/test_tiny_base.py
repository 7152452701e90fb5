"""The embedded default's tiny base: built once, cached atomically, reused; good enough at toy VQA."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from safe.models.factory import build_safe_model
from safe.models.presets import get_preset
from safe.models.tiny_base import THREADS, cache_key, ensure_tiny_base

QUICK = {"world_size": "small", "vision_steps": 10, "llm_steps": 10, "warmup": 2}
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_base_is_built_once_then_loaded_from_cache(tmp_path):
    started = time.perf_counter()
    stale = tmp_path / f".{cache_key(0, QUICK)}.tmp-killed"                 # left by a killed build
    (stale / "half").mkdir(parents=True)
    first = ensure_tiny_base(seed=0, cache_dir=tmp_path, overrides=QUICK, log=lambda *_: None)
    build_seconds = time.perf_counter() - started
    assert first.name == cache_key(0, QUICK) and first.parent == tmp_path
    # No temporary folder left behind, the stale one removed; only the entry and its lock file remain.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, f".{first.name}.lock"])
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


def test_a_failed_build_says_so_and_leaves_nothing_behind(tmp_path):
    """The build runs in a child process: its failure is the caller's clear error, not a half-written entry."""
    broken = {**QUICK, "world_size": "no-such-size"}
    lines: list[str] = []
    with pytest.raises(RuntimeError, match=r"the tiny base build failed \(exit status 1\)"):
        ensure_tiny_base(seed=0, cache_dir=tmp_path, overrides=broken, log=lines.append)
    assert [p.name for p in tmp_path.iterdir()] == [f".{cache_key(0, broken)}.lock"]
    assert any("Building the tiny base" in line for line in lines)


@pytest.mark.slow
def test_default_tiny_base_answers_toy_vqa():
    """The real default build (medium toy world, the same cache entry every other test uses): >= 95 % official VQA
    accuracy on its val split. The bar sits 3 points under this machine's build (98.0 %) and under every other model
    seed measured with this recipe (99.4 and 98.3 % for seeds 1 and 2): another CPU's float rounding moves a build
    about as far as another seed does, so the margin is the spread over seeds (1.4 points) twice over."""
    path = ensure_tiny_base(seed=0)
    info = json.loads((path / "tiny_base.json").read_text())
    assert info["vqa_val_questions"] >= 300 and info["threads"] == THREADS
    assert len(info["weights_sha256"]) == 64
    assert info["vqa_val_accuracy"] >= 0.95, info


BUILD = """
import json, sys, tempfile, torch
from pathlib import Path
from safe.models.tiny_base import build_tiny_base
torch.set_num_threads(int(sys.argv[1]))
info = build_tiny_base(Path(tempfile.mkdtemp()), seed=0, log=lambda *_: None,
                       overrides={"world_size": "small", "vision_steps": 20, "llm_steps": 30, "warmup": 5})
print(json.dumps({"sha": info["weights_sha256"], "threads": torch.get_num_threads()}))
"""


@pytest.mark.slow
def test_the_build_gives_the_same_weights_whatever_the_callers_thread_settings():
    """Two builds, the caller on 1 and on 2 intra-op threads (and OMP_NUM_THREADS to match): the same weight digest.
    (Measured: the same build run on 1 thread and on 2 gives other weights, so the fixed count is what makes this.)"""
    digests = []
    for threads in (1, 2):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
               "PATH": "/usr/bin:/bin"}
        done = subprocess.run([sys.executable, "-c", BUILD, str(threads)], capture_output=True, text=True, cwd=REPO,
                              env=env, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["threads"] == threads                      # the caller's setting is restored after the build
        digests.append(result["sha"])
    assert digests[0] == digests[1]
