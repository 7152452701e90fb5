"""Base work done once (safe.retention.base_work): a warm cache gives the very KL of the uncached path while only the
student runs; a top-k cache stays within its reported bound; `cache-base` shards by rank and resumes. A tiny SAFE
model built from configs, real toy-world images and questions."""

import subprocess
import sys

import pytest
import torch

from safe.data.collate import collate_samples
from safe.data.datasets import VQADataset
from safe.retention import Retention
from safe.retention.base_work import BaseWorkCache
from safe.training.cache_base import cache_base
from safe.training.config import build_config
from tests.helpers.tiny_model import tiny_safe_model


@pytest.fixture(scope="module")
def model():
    model = tiny_safe_model()
    with torch.no_grad():  # an open audio path, so the student differs from the teacher
        for name, p in model.named_trainable_parameters().items():
            if "alpha" in name:
                p.fill_(0.7)
    return model


@pytest.fixture(scope="module")
def collated(model, toy_world):
    dataset = VQADataset(toy_world, "train")
    dataset.image_processor = model.builder.image_processor
    return collate_samples([dataset[i] for i in range(6)])


def config_for(world, cache_dir, **extra):
    return build_config(cli_values={"variant": "soft_retention", "data_root": str(world), "train_batch_size": 6,
                                    "generation_max_new_tokens": 4, "base_work_cache_dir": str(cache_dir), **extra})


class Counting:
    """Counts the base's generate calls and gate-0 forwards of a model (the work a warm cache saves)."""

    def __init__(self, model, monkeypatch):
        self.generate = self.teacher = 0
        generate, forward = model.generate, model.forward

        def counted_generate(*args, **kwargs):
            self.generate += 1
            return generate(*args, **kwargs)

        def counted_forward(batch, gate=1.0, **kwargs):
            self.teacher += gate == 0.0
            return forward(batch, gate=gate, **kwargs)

        monkeypatch.setattr(model, "generate", counted_generate)
        monkeypatch.setattr(model, "forward", counted_forward)


def retention(model, config, base_work):
    return Retention(model, config, next_vl_batch=None, distractors=None, base_work=base_work)


def kl_of(model, config, collated, base_work):
    torch.manual_seed(0)
    features = torch.randn(collated.size, 13, model.audio_encoder.feature_dim)
    component = retention(model, config, base_work)
    batch = component.vl_batch(collated, features)
    return component.kl(batch)


def test_a_warm_cache_gives_the_uncached_kl_and_runs_only_the_student(model, collated, toy_world, tmp_path,
                                                                       monkeypatch):
    config = config_for(toy_world, tmp_path / "base")
    uncached = kl_of(model, config, collated, None)
    assert uncached > 0
    cold_cache = BaseWorkCache.for_run(model, config)
    cold = kl_of(model, config, collated, cold_cache)      # computes and stores answers + teacher logits
    assert torch.equal(cold, uncached) and cold_cache.stats["stored"] == collated.size
    cold_cache.flush()
    counting = Counting(model, monkeypatch)
    warm_cache = BaseWorkCache.for_run(model, config)     # another run of the same base
    warm = kl_of(model, config, collated, warm_cache)
    assert torch.equal(warm, uncached)                     # exact: the same bits
    assert counting.generate == 0 and counting.teacher == 0  # no base answers, no teacher forward: only the student
    assert warm_cache.stats["hits"] == 1


def test_another_base_setting_misses(model, collated, toy_world, tmp_path):
    config = config_for(toy_world, tmp_path / "base")
    cache = BaseWorkCache.for_run(model, config)
    kl_of(model, config, collated, cache)
    cache.flush()
    other = BaseWorkCache.for_run(model, config_for(toy_world, tmp_path / "base", train_batch_size=4))
    assert other.root != cache.root and other.answers(collated) == {}
    longer = BaseWorkCache.for_run(model, config_for(toy_world, tmp_path / "base", generation_max_new_tokens=5))
    assert longer.answers(collated) == {}


@pytest.mark.parametrize("top_k", [3, 1000])
def test_a_top_k_teacher_is_within_its_reported_bound(model, collated, toy_world, tmp_path, top_k):
    config = config_for(toy_world, tmp_path / "base")
    exact = kl_of(model, config, collated, None)
    topk_config = config_for(toy_world, tmp_path / "base", teacher_top_k=top_k)
    filling = BaseWorkCache.for_run(model, topk_config)
    kl_of(model, topk_config, collated, filling)
    filling.flush()
    cache = BaseWorkCache.for_run(model, topk_config)
    component = retention(model, topk_config, cache)
    torch.manual_seed(0)
    batch = component.vl_batch(collated, torch.randn(collated.size, 13, model.audio_encoder.feature_dim))
    teacher = cache.teacher(batch)
    approx = component.kl(batch)
    bound = cache.stats["topk_kl_error_bound_max"]
    assert teacher is not None and not torch.is_tensor(teacher)
    assert approx <= exact + 1e-5                          # merging the tail never raises a KL
    assert float((exact - approx).detach()) <= bound + 1e-5  # and the reported bound holds
    if top_k >= model.base.config.text_config.vocab_size:  # every token kept: exact again
        assert bound == 0 and torch.allclose(approx, exact, atol=1e-5)
    else:
        assert bound > 0


def test_cache_base_shards_by_rank_and_resumes(model, toy_world, tmp_path):
    config = config_for(toy_world, tmp_path / "base")
    first = cache_base(config, model, rank=0, world_size=2, max_questions=20, progress=False)
    assert first["computed"] == first["mine"] == 10 and first["already_cached"] == 0
    again = cache_base(config, model, rank=0, world_size=2, max_questions=20, progress=False)
    assert again["computed"] == 0 and again["already_cached"] == 10           # resumes: nothing redone
    whole = cache_base(config, model, rank=0, world_size=1, max_questions=20, progress=False)
    assert whole["computed"] == 10 and whole["already_cached"] == 10          # only rank 1's share was left
    dataset = VQADataset(toy_world, "train")
    dataset.image_processor = model.builder.image_processor
    collated = collate_samples([dataset[i] for i in range(20)])
    cache = BaseWorkCache.for_run(model, config)
    assert len(cache.answers(collated)) == 20


def test_cache_base_cli_fills_what_a_run_reads(toy_world, tmp_path):
    cmd = [sys.executable, "-m", "safe", "cache-base", "--data-root", str(toy_world), "--base-work-cache-dir",
           str(tmp_path / "base"), "--max-questions", "24", "--num-workers", "2", "--no-progress",
           "--generation-max-new-tokens", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("24 questions answered, 0 already cached")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and again.stdout.startswith("0 questions answered, 24 already cached"), again.stdout
