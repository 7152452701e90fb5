"""The evaluation's controls: derangement, representative subsets, paired bootstrap intervals, the base-answer
cache key, held-out distractors and WavCaps leakage (docs/metrics.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from safe.data.datasets import AudioCapsDataset, VQADataset, WavCapsDataset
from safe.data.leakage import banned_keys, read_blacklist
from safe.data.manifest import read_jsonl, write_jsonl
from safe.data.subsets import spread_subset
from safe.eval.bootstrap import paired_bootstrap_ci
from safe.eval.listening import SwappedAudio, derangement


def test_derangement_is_a_seeded_permutation_without_fixed_points():
    for n in (2, 3, 10, 101):
        for seed in range(5):
            perm = derangement(n, seed)
            assert sorted(perm) == list(range(n))
            assert all(perm[i] != i for i in range(n))
            assert perm == derangement(n, seed)
    assert derangement(50, 0) != derangement(50, 1)
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_swapped_audio_keeps_the_clip_id_and_references(toy_world):
    clips = AudioCapsDataset(toy_world, "val", sample_rate=16000, clip_seconds=1.0, training=False)
    partner = derangement(len(clips), 0)
    swapped = SwappedAudio(clips, partner)
    for i in range(3):
        item = swapped[i]
        assert item["id"] == clips.items[i]["id"] and item["references"] == clips.items[i]["references"]
        assert item["audio_path"] == str(clips.items[partner[i]]["path"]) != str(clips.items[i]["path"])
        assert np.array_equal(item["audio"], clips[partner[i]]["audio"])


def test_spread_subset_covers_more_images_than_the_first_n():
    groups = [image for image in range(40) for _ in range(5)]       # 200 questions, grouped by image as VQA v2
    chosen = spread_subset(groups, 30, seed=0)
    assert len(chosen) == len(set(chosen)) == 30 and chosen == sorted(chosen)
    assert len({groups[i] for i in chosen}) == 30                   # one question from each of 30 images
    assert len({groups[i] for i in range(30)}) == 6                 # the first 30 are 6 images
    assert spread_subset(groups, 30, seed=0) == chosen and spread_subset(groups, 30, seed=1) != chosen
    assert len({groups[i] for i in spread_subset(groups, 60, seed=0)}) == 40   # every image before a second
    assert spread_subset(groups, 500, seed=0) == list(range(200))


def test_vqa_evaluation_subset_is_spread_over_images(tmp_path):
    rows = [{"question_id": image * 10 + q, "image_path": f"images/val2014/{image}.png", "question": f"q{q}?",
             "answers": ["yes"] * 10, "multiple_choice_answer": "yes", "answer_type": "yes/no",
             "question_type": "is"} for image in range(20) for q in range(4)]
    write_jsonl(tmp_path / "vqa" / "vqa_val.jsonl", rows)
    for image in range(20):
        (tmp_path / "vqa" / "images" / "val2014").mkdir(parents=True, exist_ok=True)
        (tmp_path / "vqa" / "images" / "val2014" / f"{image}.png").write_bytes(b"")
    subset = VQADataset(tmp_path, "val", max_samples=12, subset_seed=3)
    first = [row["image_path"] for row in rows[:12]]
    assert len({item["image_path"] for item in subset.items}) == 12 > len(set(first)) == 3
    again = VQADataset(tmp_path, "val", max_samples=12, subset_seed=3)
    assert [i["question_id"] for i in again.items] == [i["question_id"] for i in subset.items]


def test_paired_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_items():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        first = {i: float(v) for i, v in enumerate(rng.normal(1.0, 3.0, n))}
        second = {i: first[i] - float(d) for i, d in enumerate(rng.normal(0.5, 1.0, n))}
        low, high = paired_bootstrap_ci(first, second, seed=0)
        estimate = np.mean([first[i] - second[i] for i in first])
        assert low < estimate < high
        widths.append(high - low)
        assert paired_bootstrap_ci(first, second, seed=0) == [low, high]   # seeded
    assert widths[1] < widths[0] / 2
    # Pairing: a shared per-item effect cancels, so the interval is far tighter than the items' spread.
    shared = rng.normal(0, 10, 200)
    first = {i: float(shared[i] + 1) for i in range(200)}
    second = {i: float(shared[i]) for i in range(200)}
    assert paired_bootstrap_ci(first, second) == pytest.approx([1.0, 1.0])
    assert paired_bootstrap_ci({1: 1.0}, {1: 0.0}) is None


def test_wavcaps_rows_of_audiocaps_eval_clips_or_blacklisted_are_dropped_and_counted(toy_world, tmp_path):
    import shutil

    root = tmp_path / "world"
    shutil.copytree(toy_world, root)
    manifest = root / "wavcaps" / "wavcaps_train.jsonl"
    rows = read_jsonl(manifest)
    val_clip = read_jsonl(root / "audiocaps" / "audiocaps_val.jsonl")[0]
    leaked = dict(rows[0], id=f"Y{val_clip['youtube_id']}.wav")            # WavCaps' AudioSet naming
    listed = dict(rows[1], id="Yblacklisted0001.wav")
    write_jsonl(manifest, [leaked, listed] + rows[2:])
    blacklist = tmp_path / "blacklist_exclude_test_ac.json"
    blacklist.write_text(json.dumps({"AudioSet": ["blacklisted0001"], "FreeSound": []}))

    from safe.training.config import build_config
    from safe.training.data import load_run_data

    config = build_config(cli_values={"data_root": str(root), "use_wavcaps": True,
                                      "wavcaps_blacklist": str(blacklist)})
    data = load_run_data(config, 16000, 1.0)
    assert data.wavcaps_dropped_overlap == 2
    wavcaps = data.audio_train.datasets[1]
    assert len(wavcaps) == len(rows) - 2
    assert {item["id"] for item in wavcaps.items}.isdisjoint({leaked["id"], listed["id"]})
    # Without the blacklist only the AudioCaps val clip goes.
    config = build_config(cli_values={"data_root": str(root), "use_wavcaps": True})
    assert load_run_data(config, 16000, 1.0).wavcaps_dropped_overlap == 1
    assert banned_keys(["abc", None], read_blacklist(blacklist)) == {"abc", "blacklisted0001"}


def test_wavcaps_without_banned_ids_keeps_every_row(toy_world):
    wavcaps = WavCapsDataset(toy_world, "train", sample_rate=16000, clip_seconds=1.0, banned=set())
    assert len(wavcaps) == len(read_jsonl(toy_world / "wavcaps" / "wavcaps_train.jsonl"))
    assert wavcaps.dropped_overlap == []


def test_eval_distractors_are_clips_never_trained_on(toy_world):
    from safe.training.config import build_config
    from safe.training.data import load_run_data

    config = build_config(cli_values={"data_root": str(toy_world), "max_audio_eval_samples": 6})
    data = load_run_data(config, 16000, 1.0)
    train_files = {str(item["path"]) for item in data.audio_train.items}
    distractor_files = {str(item["path"]) for item in data.eval_distractors.items}
    captioned = {str(item["path"]) for item in data.audio_val.items}
    assert distractor_files and distractor_files.isdisjoint(train_files) and distractor_files.isdisjoint(captioned)
    assert "audiocaps test" in data.eval_distractor_source and "val" in data.eval_distractor_source
    # Every val clip captioned and no test split: the captioned clips themselves (still never trained on).
    from safe.training.data import eval_distractor_clips

    clips, source = eval_distractor_clips({"val": data.audio_val}, data.audio_val)
    assert clips is data.audio_val and "no other held-out clips" in source


def test_the_base_answer_cache_misses_when_the_numerics_change(tmp_path):
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers.tiny_model import tiny_safe_model

    from safe.training.evaluator import BasePredictionCache

    model = tiny_safe_model()
    manifest = tmp_path / "vqa.jsonl"
    write_jsonl(manifest, [{"question_id": 1}])
    calls = []

    def answers(cache):
        return cache.get_or_compute("vqa", manifest, [1], lambda: calls.append(1) or {1: "red"})

    decoding = {"max_new_tokens": 4, "num_beams": 1}
    assert answers(BasePredictionCache(model, decoding, tmp_path, batch_size=16)) == {"1": "red"}
    answers(BasePredictionCache(model, decoding, tmp_path, batch_size=16))
    assert len(calls) == 1                                                   # same numerics: a hit
    answers(BasePredictionCache(model, decoding, tmp_path, batch_size=8))
    assert len(calls) == 2                                                   # another batch size: a miss
    answers(BasePredictionCache(model, decoding, tmp_path, batch_size=16, world_size=4))
    assert len(calls) == 3                                                   # another world size: a miss
    model.base.to(torch.bfloat16)
    answers(BasePredictionCache(model, decoding, tmp_path, batch_size=16))
    assert len(calls) == 4                                                   # another dtype: a miss


@pytest.mark.slow
def test_an_untrained_model_with_its_gate_open_does_not_listen(toy_world, tmp_path):
    """The listening control's null case: a random projector behind open gates changes the captions per clip, but
    not towards that clip's references, so another clip's audio scores the same (the trained case is in
    test_toy_run: the gain is far above zero there)."""
    import torch

    from safe.training.config import build_config
    from safe.training.trainer import Trainer

    trainer = Trainer(build_config(cli_values={
        "model_config": "tiny", "data_root": str(toy_world), "output_root": str(tmp_path), "variant": "no_retention",
        "num_workers": 0, "progress": False, "max_steps": 1, "max_audio_eval_samples": 40,
        "max_vl_eval_samples": 4, "generation_max_new_tokens": 12}))
    with torch.no_grad():
        for name, parameter in trainer.model.named_trainable_parameters().items():
            if name.endswith(".alpha"):
                parameter.fill_(1.0)                                          # tanh(1) = 0.76: the gates are open
    validation = trainer.evaluator.run(0)
    assert validation["audio_cider"] != validation["audio_cider_muted"]     # the audio does reach the captions
    # ... but it is not listened to: another clip's audio scores the same, within noise (a trained toy model's gain
    # is ~90 after 250 steps, test_toy_run).
    assert abs(validation["audio_listen_gain"]) < 10, validation
