"""`safe cache-features` (docs/design.md, "Caches and their keys"): fills the cache the trainer reads (the first
window of each clip by default, all or N on request), says its size first, resumes after a kill, shards by rank,
skips unreadable clips. Real toy-world files, the real tiny encoder, and real subprocesses of the command."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from safe.data.audio import load_audio
from safe.data.datasets import AudioCapsDataset
from safe.data.feature_cache import FeatureCache
from safe.models.audio_encoders import TinyConvEncoder
from safe.training.cache_features import cache_features, planned_windows
from safe.training.config import build_config


def config_for(world, cache_dir, **extra):
    return build_config(cli_values={"data_root": str(world), "feature_cache_dir": str(cache_dir), **extra})


def entries(cache_root):
    """Entries written so far: distinct places in shards named by the cache's indexes (an entry is indexed twice, by
    content and by location)."""
    import numpy as np

    places = set()
    for index in Path(cache_root).rglob("*.index"):
        with np.load(index) as saved:
            places |= {(str(saved["shards"][row["shard"]]), int(row["offset"])) for row in saved["rows"]}
    return len(places)


def test_every_training_window_and_eval_clip_is_cached_exactly(tmp_path, toy_world):
    encoder = TinyConvEncoder(seed=0)
    config = config_for(toy_world, tmp_path / "cache")
    summary = cache_features(config, encoder, ["val"], batch_size=1, num_workers=0, progress=False, windows=None)
    assert summary["encoded"] == summary["windows"] > summary["clips"] > 0  # some clips have several windows
    assert summary["unreadable"] == []
    assert summary["files"] == 2  # one shard and its index for the whole toy world
    cache = FeatureCache.for_encoder(encoder, tmp_path / "cache", data_root=toy_world)
    train = AudioCapsDataset(toy_world, "train", sample_rate=16000, clip_seconds=4.0, training=True, seed=0)
    train.feature_cache = cache
    for epoch in range(3):                        # every crop a run can draw is a hit
        assert all("features" in train[(epoch, i)] for i in range(len(train)))
    val = AudioCapsDataset(toy_world, "val", sample_rate=16000, clip_seconds=4.0, training=False)
    val.feature_cache = cache
    item = val[0]
    # Encoded one clip at a time, a cached feature is bit-identical to a fresh encode of that window.
    audio = load_audio(item["audio_path"], 16000, 4.0, window_index=item["window"])
    assert torch.equal(item["features"], encoder(torch.from_numpy(audio)[None])[0])


def test_the_first_window_by_default_and_n_on_request(tmp_path, toy_world):
    encoder = TinyConvEncoder(seed=0)
    config = config_for(toy_world, tmp_path / "cache")
    every, _ = planned_windows(config, 16000, 4.0, ["val"], None)
    one, _ = planned_windows(config, 16000, 4.0, ["val"], 1)
    assert max(every.values()) == 2 and set(one.values()) == {1}             # toy clips have 1 or 2 windows
    first = cache_features(config, encoder, ["val"], num_workers=0, progress=False)
    assert first["encoded"] == first["windows"] == first["clips"]          # one window a clip
    more = cache_features(config, encoder, ["val"], num_workers=0, progress=False, windows=2)
    assert more["already_cached"] == first["clips"] and more["encoded"] == sum(every.values()) - first["clips"] > 0


def test_ranks_split_the_work_and_a_rerun_encodes_only_what_is_missing(tmp_path, toy_world):
    encoder = TinyConvEncoder(seed=0)
    config = config_for(toy_world, tmp_path / "cache")
    counts = [cache_features(config, encoder, ["val"], num_workers=0, rank=r, world_size=3, progress=False,
                             windows=None)["encoded"] for r in (0, 2)]  # rank 1 never ran (a failed node)
    total = cache_features(config, encoder, ["val"], num_workers=0, progress=False, windows=None)
    assert min(counts) > 0 and total["encoded"] == total["windows"] - sum(counts) > 0
    assert total["already_cached"] == sum(counts)


def test_a_killed_fill_resumes_from_its_last_shard(tmp_path, toy_world):
    """A real `safe cache-features` killed (SIGKILL) after its first shards: the rerun encodes only the rest."""
    cmd = [sys.executable, "-m", "safe", "cache-features", "--data-root", str(toy_world), "--feature-cache-dir",
           str(tmp_path / "cache"), "--num-workers", "0", "--batch-size", "1", "--windows", "all",
           "--shard-mb", "0.05", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list((tmp_path / "cache").rglob("*.index"))) < 2:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL, job.stderr.read()
    written = entries(tmp_path / "cache")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    encoded = int(done.stdout.split(" windows encoded")[0].split()[-1])
    planned = int(re.search(r"clips, (\d+) windows;", done.stdout).group(1))
    assert 0 < written < planned and encoded == planned - written
    assert entries(tmp_path / "cache") == planned


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
    assert "windows to encode: about" in done.stdout  # the size is said before writing
    encoded = int(done.stdout.split(" windows encoded")[0].split()[-1])
    assert encoded > 0 and entries(tmp_path / "cache") == encoded
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
    assert entries(tmp_path / "cache") == len(with_wavcaps) > len(plain)  # the first window of each clip


def test_cli_refuses_a_missing_data_root(tmp_path):
    done = subprocess.run([sys.executable, "-m", "safe", "cache-features", "--data-root", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "nope" in done.stderr and "Traceback" not in done.stderr
