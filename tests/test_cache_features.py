"""`safe cache-features` (DESIGN §10): fills the cache the trainer reads, resumes, skips unreadable clips.
Real toy-world files, the real tiny encoder, and one real subprocess of the command."""

import json
import shutil
import subprocess
import sys

import torch

from safe.config import build_config
from safe.data.audio import load_audio
from safe.data.datasets import AudioCapsDataset
from safe.data.feature_cache import FeatureCache
from safe.models.audio_encoders import TinyConvEncoder
from safe.training.cache_features import cache_features, planned_windows


def config_for(world, cache_dir, **extra):
    return build_config(cli_values={"data_root": str(world), "feature_cache_dir": str(cache_dir), **extra})


def test_every_training_window_and_eval_clip_is_cached_exactly(tmp_path, toy_world):
    encoder = TinyConvEncoder(seed=0)
    config = config_for(toy_world, tmp_path / "cache")
    summary = cache_features(config, encoder, ["val"], batch_size=1, num_workers=0, progress=False)
    assert summary["encoded"] == summary["windows"] > summary["clips"] > 0  # some clips have several windows
    assert summary["unreadable"] == []
    cache = FeatureCache.for_encoder(encoder, tmp_path / "cache")
    train = AudioCapsDataset(toy_world, "train", sample_rate=16000, clip_seconds=4.0, training=True, seed=0)
    train.feature_cache = cache
    for epoch in range(3):                        # every crop a run can draw is a hit
        train.set_epoch(epoch)
        assert all("features" in train[i] for i in range(len(train)))
    val = AudioCapsDataset(toy_world, "val", sample_rate=16000, clip_seconds=4.0, training=False)
    val.feature_cache = cache
    item = val[0]
    # Encoded one clip at a time, a cached feature is bit-identical to a fresh encode of that window.
    audio = load_audio(item["audio_path"], 16000, 4.0, window_index=item["window"])
    assert torch.equal(item["features"], encoder(torch.from_numpy(audio)[None])[0])


def test_an_interrupted_fill_resumes_with_only_the_missing_entries(tmp_path, toy_world):
    encoder = TinyConvEncoder(seed=0)
    config = config_for(toy_world, tmp_path / "cache")
    first = cache_features(config, encoder, ["val"], batch_size=8, num_workers=0, progress=False)
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == first["windows"]
    for entry in entries[::3]:                    # as if the job had been killed before writing these
        entry.unlink()
    again = cache_features(config, encoder, ["val"], batch_size=8, num_workers=0, progress=False)
    assert again["encoded"] == len(entries[::3])
    assert again["already_cached"] == first["windows"] - len(entries[::3])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == first["windows"]


def test_ranks_split_the_work_without_overlap(tmp_path, toy_world):
    encoder = TinyConvEncoder(seed=0)
    config = config_for(toy_world, tmp_path / "cache")
    counts = [cache_features(config, encoder, ["val"], num_workers=0, rank=r, world_size=3, progress=False)["encoded"]
              for r in range(3)]
    total = cache_features(config, encoder, ["val"], num_workers=0, progress=False)
    assert total["encoded"] == 0 and sum(counts) == total["windows"] and min(counts) > 0


def test_wavcaps_clips_are_added_on_request(tmp_path, toy_world):
    plain, _ = planned_windows(config_for(toy_world, tmp_path), 16000, 4.0, ["val"])
    with_wavcaps, _ = planned_windows(config_for(toy_world, tmp_path, use_wavcaps=True), 16000, 4.0, ["val"])
    assert set(plain) < set(with_wavcaps)
    assert any("wavcaps" in path for path in set(with_wavcaps) - set(plain))


def test_cli_skips_and_lists_an_unreadable_clip(tmp_path, toy_world):
    world = tmp_path / "world"
    shutil.copytree(toy_world, world)
    rows = [json.loads(line) for line in (world / "audiocaps" / "audiocaps_train.jsonl").read_text().splitlines()]
    broken = world / "audiocaps" / rows[0]["audio_path"]
    broken.write_bytes(b"not audio at all")
    cmd = [sys.executable, "-m", "safe", "cache-features", "--data-root", str(world), "--feature-cache-dir",
           str(tmp_path / "cache"), "--num-workers", "2", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "1 unreadable clip(s) skipped" in done.stdout and broken.name in done.stdout
    encoded = int(done.stdout.split(" windows encoded")[0].split()[-1])
    assert encoded > 0 and len(list((tmp_path / "cache").rglob("*.safetensors"))) == encoded
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert any(line.startswith("0 windows encoded") for line in again.stdout.splitlines()), again.stdout
    assert "float32 on cpu" in again.stdout  # the dtype the entries are keyed by is said


def test_cli_takes_the_runs_yaml_settings(tmp_path, toy_world):
    from safe.cli import main

    settings = tmp_path / "run.yaml"
    settings.write_text(f"data:\n  data_root: {toy_world}\n  use_wavcaps: true\n")
    plain, _ = planned_windows(config_for(toy_world, tmp_path), 16000, 4.0, ["val"])
    with_wavcaps, _ = planned_windows(config_for(toy_world, tmp_path, use_wavcaps=True), 16000, 4.0, ["val"])
    assert main(["cache-features", "--config", str(settings), "--feature-cache-dir", str(tmp_path / "cache"),
                 "--num-workers", "0", "--no-progress"]) == 0
    entries = len(list((tmp_path / "cache").rglob("*.safetensors")))
    assert entries == sum(with_wavcaps.values()) > sum(plain.values())


def test_cli_refuses_a_missing_data_root(tmp_path):
    done = subprocess.run([sys.executable, "-m", "safe", "cache-features", "--data-root", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "nope" in done.stderr and "Traceback" not in done.stderr
