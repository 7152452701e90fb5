"""Frozen audio-feature cache (docs/design.md, "Caches and their keys"): exact reuse, keys that survive a move of the
data root and miss a changed file, sharded files whose bad entries are recovered one by one, and that training gives
the same result with and without it. Real audio files, the real tiny encoder."""

import os
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from safe.data.audio import load_audio, window_starts
from safe.data.collate import collate_samples
from safe.data.datasets import AudioCapsDataset
from safe.data.feature_cache import FeatureCache
from safe.models.audio_encoders import TinyConvEncoder
from safe.training.features import batch_features


@pytest.fixture(scope="module")
def encoder():
    return TinyConvEncoder(seed=0)


def fresh(encoder, path, window=0):
    audio = load_audio(path, encoder.sample_rate, encoder.clip_seconds, window_index=window)
    return encoder(torch.from_numpy(audio)[None])[0]


def make_cache(root, encoder, **kwargs):
    return FeatureCache(root, encoder.encoder_id, encoder.sample_rate, encoder.clip_seconds, **kwargs)


def shard_files(root):
    return sorted(root.rglob("*.shard"))


def entry_rows(cache):
    """(offset, size) of each entry in the cache's one shard, in write order."""
    cache.store.refresh()
    cache.store._merge()
    return sorted({(int(r["offset"]), int(r["size"])) for r in cache.store._rows})  # entries and their aliases


class EncoderOnly:
    def __init__(self, encoder):
        self.audio_encoder, self.device = encoder, torch.device("cpu")
        self.calls = 0

    def audio_features(self, waveforms):
        self.calls += 1
        return self.audio_encoder(waveforms)


def test_cached_feature_equals_fresh(tmp_path, encoder):
    clip = tmp_path / "a.wav"
    # Noise, longer than the 4 s crop (several windows) and at 22.05 kHz (resampled to 16 kHz).
    sf.write(str(clip), 0.1 * np.random.default_rng(0).standard_normal(6 * 22050).astype(np.float32), 22050)
    cache = make_cache(tmp_path / "cache", encoder)
    assert len(window_starts(sf.info(str(clip)).frames, 4 * 22050)) > 1
    for window in (0, 1):
        assert cache.get(clip, window) is None
        expected = fresh(encoder, clip, window)
        cache.put(clip, window, expected)
        got = cache.get(clip, window)
        assert got is not None and got.dtype == expected.dtype
        assert torch.equal(got, fresh(encoder, clip, window))
    assert not torch.equal(cache.get(clip, 0), cache.get(clip, 1))  # windows are separate entries


def test_dataset_serves_cached_features_equal_to_fresh(tmp_path, toy_world, encoder):
    dataset = AudioCapsDataset(toy_world, "train", sample_rate=16000, clip_seconds=4.0, training=True, seed=3)
    dataset.feature_cache = make_cache(tmp_path / "cache", encoder)
    model = EncoderOnly(encoder)
    items = [dataset[i] for i in range(6)]
    assert all("audio" in item for item in items)
    first = batch_features(collate_samples(items), model, dataset.feature_cache)  # encodes and stores
    again = [dataset[i] for i in range(6)]
    assert all("features" in item and "audio" not in item for item in again)
    calls = model.calls
    second = batch_features(collate_samples(again), model, dataset.feature_cache)
    assert model.calls == calls  # no encoder call on a warm cache
    assert torch.equal(first, second)
    # A fresh encode of the same batch gives the same bits as the cache.
    assert torch.equal(second, encoder(collate_samples(items).audio))
    # One clip at a time agrees to float rounding only: the encoder's conv/einsum kernels are batch-size
    # dependent at ~1e-6 (measured), so the cache is bit-exact w.r.t. the batch a feature was first encoded in.
    for item in again:
        torch.testing.assert_close(item["features"], fresh(encoder, item["audio_path"], item["window"]),
                                   rtol=1e-5, atol=1e-5)


def test_changed_file_misses(tmp_path, tone_writer, encoder):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 3.0, 16000, freq=440.0)
    cache = make_cache(tmp_path / "cache", encoder)
    cache.put(clip, 0, fresh(encoder, clip))
    assert cache.get(clip, 0) is not None
    # Same length and format (same size), other content; mtime moved on explicitly so the test never depends
    # on the file system's timestamp resolution.
    size = clip.stat().st_size
    stat = clip.stat()
    tone_writer(clip, 3.0, 16000, freq=880.0)
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert clip.stat().st_size == size
    assert cache.get(clip, 0) is None
    cache.put(clip, 0, fresh(encoder, clip))
    assert torch.equal(cache.get(clip, 0), fresh(encoder, clip))
    # A size change alone (mtime restored) also misses.
    stat = clip.stat()
    tone_writer(clip, 3.5, 16000, freq=880.0)
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.get(clip, 0) is None


def test_changed_encoder_misses(tmp_path, tone_writer, encoder):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    first = make_cache(tmp_path / "cache", encoder)
    first.put(clip, 0, fresh(encoder, clip))
    first.flush()
    assert make_cache(tmp_path / "cache", encoder).get(clip, 0) is not None
    other = TinyConvEncoder(seed=1)
    assert other.encoder_id != encoder.encoder_id
    assert make_cache(tmp_path / "cache", other).get(clip, 0) is None
    # Same encoder id but another crop length or rate: another entry too.
    assert FeatureCache(tmp_path / "cache", encoder.encoder_id, 16000, 2.0).get(clip, 0) is None
    assert FeatureCache(tmp_path / "cache", encoder.encoder_id, 48000, 4.0).get(clip, 0) is None


def three_entries(tmp_path, tone_writer, encoder):
    clips = [tmp_path / "world" / f"{i}.wav" for i in range(3)]
    for i, clip in enumerate(clips):
        tone_writer(clip, 2.0, 16000, freq=300.0 + 100 * i)
    cache = make_cache(tmp_path / "cache", encoder, data_root=tmp_path / "world")
    expected = [fresh(encoder, clip) for clip in clips]
    for clip, features in zip(clips, expected):
        cache.put(clip, 0, features)
    cache.flush()
    (shard,) = shard_files(tmp_path / "cache")
    return clips, expected, shard


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_bad_entry_in_a_shard_is_recovered_alone(tmp_path, tone_writer, encoder, damage, capsys):
    clips, expected, shard = three_entries(tmp_path, tone_writer, encoder)
    rows = entry_rows(make_cache(tmp_path / "cache", encoder))
    data = bytearray(shard.read_bytes())
    victim = 1 if damage == "flip" else 2
    offset, size = rows[victim]
    if damage == "flip":  # one low mantissa bit of one value deep inside the entry: still a plausible float
        data[offset + size - 401] ^= 0x01
    else:                 # the last entry cut short
        data = data[: offset + size // 2]
    shard.write_bytes(bytes(data))
    cache = make_cache(tmp_path / "cache", encoder, data_root=tmp_path / "world")  # a new process: nothing in memory
    got = [cache.get(clip, 0) for clip in clips]
    assert got[victim] is None and cache.rejected == 1
    assert "fails its checksum or is cut short" in capsys.readouterr().err
    for i in set(range(3)) - {victim}:           # the shard's other entries still serve, bit for bit
        assert torch.equal(got[i], expected[i])
    cache.put(clips[victim], 0, fresh(encoder, clips[victim]))  # what the loader does after a miss
    cache.flush()
    again = make_cache(tmp_path / "cache", encoder, data_root=tmp_path / "world")
    assert torch.equal(again.get(clips[victim], 0), expected[victim]) and again.rejected == 0  # newest copy first


def test_a_damaged_index_costs_its_entries_only(tmp_path, tone_writer, encoder, capsys):
    clips, expected, _ = three_entries(tmp_path, tone_writer, encoder)
    (index,) = sorted((tmp_path / "cache").rglob("*.index"))
    index.write_bytes(b"garbage")
    cache = make_cache(tmp_path / "cache", encoder, data_root=tmp_path / "world")
    assert all(cache.get(clip, 0) is None for clip in clips) and cache.rejected == 1
    assert "cannot be read" in capsys.readouterr().err


def test_non_finite_features_are_not_served(tmp_path, tone_writer, encoder):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    cache = make_cache(tmp_path / "cache", encoder)
    cache.put(clip, 0, torch.full(fresh(encoder, clip).shape, float("nan")))
    cache.flush()
    assert make_cache(tmp_path / "cache", encoder).get(clip, 0) is None


def test_an_entry_survives_moving_the_data_root(tmp_path, tone_writer, encoder):
    from safe.data import file_identity

    old, new = tmp_path / "scratch_a" / "data", tmp_path / "scratch_b" / "staged"
    clip = old / "audiocaps" / "audio" / "x.wav"
    tone_writer(clip, 6.0, 16000)
    cache = make_cache(tmp_path / "cache", encoder, data_root=old)
    expected = [fresh(encoder, clip, w) for w in (0, 1)]
    for window, features in enumerate(expected):
        cache.put(clip, window, features)
    cache.flush()
    new.parent.mkdir(parents=True)
    shutil.move(str(old), str(new))              # re-staged elsewhere (new absolute paths, new mtimes on a copy)
    moved = new / "audiocaps" / "audio" / "x.wav"
    os.utime(moved, ns=(0, 10**18))
    cache = make_cache(tmp_path / "cache", encoder, data_root=new)
    for window in (0, 1):
        assert torch.equal(cache.get(moved, window), expected[window])
    cache.flush()                                # records the new location as an alias
    file_identity._content_hash.cache_clear()
    later = make_cache(tmp_path / "cache", encoder, data_root=new)
    assert torch.equal(later.get(moved, 1), expected[1])
    assert file_identity._content_hash.cache_info().misses == 0  # found by location: the clip was not hashed again


def test_shards_hold_many_entries_and_the_index_finds_each(tmp_path, tone_writer, encoder):
    clips = [tmp_path / f"{i}.wav" for i in range(12)]
    for i, clip in enumerate(clips):
        tone_writer(clip, 2.0, 16000, freq=200.0 + 50 * i)
    features = [fresh(encoder, clip) for clip in clips]
    from safetensors.torch import save

    from safe.data.feature_cache import FORMAT

    per_entry = len(save({"features": features[0].contiguous()}, metadata={"format": FORMAT}))
    assert per_entry <= FeatureCache.entry_bytes(features[0])                 # the size estimate is an upper bound
    cache = make_cache(tmp_path / "cache", encoder, shard_bytes=5 * per_entry)  # a shard every 5 entries
    for clip, f in zip(clips, features):
        cache.put(clip, 0, f)
    cache.flush()
    assert len(shard_files(tmp_path / "cache")) == 3                      # 5 + 5 + 2 entries
    assert len(list((tmp_path / "cache").rglob("*.index"))) == 3
    reader = make_cache(tmp_path / "cache", encoder, memory_mb=0)
    assert all(torch.equal(reader.get(c, 0), f) for c, f in zip(clips, features))


def test_a_v1_cache_is_named_for_a_rebuild(tmp_path, tone_writer, encoder, capsys):
    old = tmp_path / "cache" / "d162739ae03a91f1" / "ab"
    old.mkdir(parents=True)
    (old / "ab12.safetensors").write_bytes(b"v1 entry")
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    cache = make_cache(tmp_path / "cache", encoder)
    assert cache.get(clip, 0) is None
    err = capsys.readouterr().err
    assert "older one-file-per-window format (v1" in err and "d162739ae03a91f1" in err and "delete" in err


def test_pre_pool_grid_is_what_the_projector_consumes():
    from safe.models.projector import AudioProjector, pre_pool

    torch.manual_seed(0)
    projector = AudioProjector(feature_dim=12, hidden_size=8, num_tokens=16, pre_pool_steps=32)
    assert projector.grid == 32
    clap_like = torch.randn(3, 64, 12)                                    # CLAP: 64 patches
    cached = pre_pool(clap_like, projector.grid)
    assert cached.shape == (3, 32, 12)
    assert torch.equal(projector(cached), projector(clap_like))          # lossless for the projector, bit for bit
    # For T a multiple of the grid, the two poolings are one pooling to k (to float rounding).
    one_stage = torch.nn.functional.adaptive_avg_pool1d(clap_like.transpose(1, 2), 16).transpose(1, 2)
    two_stage = torch.nn.functional.adaptive_avg_pool1d(cached.transpose(1, 2), 16).transpose(1, 2)
    torch.testing.assert_close(two_stage, one_stage, rtol=1e-6, atol=1e-6)
    whisper_like = torch.randn(2, 500, 12, dtype=torch.bfloat16)          # 10 s of Whisper frames, bf16 on GPU
    assert pre_pool(whisper_like, 32).dtype == torch.bfloat16
    assert torch.equal(projector(pre_pool(whisper_like, 32)), projector(whisper_like))
    short = torch.randn(1, 20, 12)
    assert pre_pool(short, 32) is short                                   # fewer steps than the grid: kept


def test_memory_layer_serves_repeats_and_still_misses_a_changed_file(tmp_path, tone_writer, encoder):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000, freq=440.0)
    root = tmp_path / "cache"
    cache = make_cache(root, encoder)
    expected = fresh(encoder, clip)
    cache.put(clip, 0, expected)
    cache.store._pending.clear()                 # never written: served from memory, no file read
    assert torch.equal(cache.get(clip, 0), expected)
    assert cache.contains(clip, 0)
    stat = clip.stat()
    tone_writer(clip, 2.0, 16000, freq=880.0)    # another content, mtime moved on
    os.utime(clip, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert cache.get(clip, 0) is None and not cache.contains(clip, 0)


def test_memory_layer_keeps_to_its_budget(tmp_path, tone_writer, encoder):
    clips = [tmp_path / f"{i}.wav" for i in range(3)]
    for i, clip in enumerate(clips):
        tone_writer(clip, 2.0, 16000, freq=300.0 + 100 * i)
    features = [fresh(encoder, clip) for clip in clips]
    entry_bytes = features[0].numel() * features[0].element_size()
    cache = FeatureCache(tmp_path / "cache", encoder.encoder_id, 16000, 4.0, memory_mb=2.5 * entry_bytes / 2**20)
    for clip, feature in zip(clips, features):
        cache.put(clip, 0, feature)
    cache.flush()
    assert len(cache._memory) == 2 and cache._memory_used <= cache.memory_bytes  # the oldest was evicted
    assert all(torch.equal(cache.get(c, 0), f) for c, f in zip(clips, features))  # the evicted one from disk
    off = FeatureCache(tmp_path / "cache", encoder.encoder_id, 16000, 4.0, memory_mb=0)
    assert torch.equal(off.get(clips[0], 0), features[0]) and not off._memory


def test_entries_held_in_memory_do_not_keep_their_files_mapped(tmp_path, tone_writer, encoder):
    clips = [tmp_path / f"{i}.wav" for i in range(5)]
    for i, clip in enumerate(clips):
        tone_writer(clip, 2.0, 16000, freq=300.0 + 50 * i)
        writer = make_cache(tmp_path / "cache", encoder)
        writer.put(clip, 0, fresh(encoder, clip))
        writer.flush()
    reader = make_cache(tmp_path / "cache", encoder)
    held = [reader.get(clip, 0) for clip in clips]
    assert all(h is not None for h in held) and len(reader._memory) == 5
    maps = open("/proc/self/maps").read()
    assert str(tmp_path / "cache") not in maps  # copies, not views of memory-mapped entry files


def test_pickled_cache_starts_with_an_empty_memory(tmp_path, tone_writer, encoder):
    import pickle

    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    cache = make_cache(tmp_path / "cache", encoder)
    cache.put(clip, 0, fresh(encoder, clip))
    cache.flush()
    copy = pickle.loads(pickle.dumps(cache))     # what a DataLoader worker receives
    assert not copy._memory and copy._memory_used == 0
    assert torch.equal(copy.get(clip, 0), cache.get(clip, 0))


def test_encoder_dtype_is_part_of_the_key(tmp_path, tone_writer):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    fp32 = TinyConvEncoder(seed=0)
    bf16 = TinyConvEncoder(seed=0).to(torch.bfloat16)
    cache32 = FeatureCache.for_encoder(fp32, tmp_path / "cache")
    cache16 = FeatureCache.for_encoder(bf16, tmp_path / "cache")
    assert cache32.encoder_id != cache16.encoder_id
    cache32.put(clip, 0, fresh(fp32, clip))
    assert cache16.get(clip, 0) is None and cache32.get(clip, 0) is not None


def test_missing_clip_is_not_the_cache_business(tmp_path, encoder):
    assert make_cache(tmp_path / "cache", encoder).get(tmp_path / "nope.wav", 0) is None


@pytest.mark.slow
def test_training_identical_with_and_without_cache(tmp_path, toy_world):
    from safe.training.config import build_config
    from safe.training.trainer import Trainer

    def train(cache_on: bool, name: str, steps: int) -> dict:
        config = build_config(cli_values={
            "model_config": "tiny", "data_root": str(toy_world), "output_root": str(tmp_path / name),
            "variant": "no_retention", "feature_cache": cache_on, "feature_cache_dir": str(tmp_path / "features"),
            "train_batch_size": 4, "num_workers": 0, "max_steps": steps, "progress": False, "tensorboard": False,
            "seed": 5})
        trainer = Trainer(config)
        for _ in range(steps):
            trainer.train_step()
        return {n: p.detach().clone() for n, p in trainer.params.items()}, trainer

    steps = 3
    without, _ = train(False, "off", steps)
    cold, trainer = train(True, "cold", steps)  # fills the cache
    trainer.feature_cache.flush()
    assert list((tmp_path / "features").rglob("*.shard"))
    warm, _ = train(True, "warm", steps)         # reads it back
    for name in without:
        assert torch.equal(without[name], cold[name]), name
        assert torch.equal(without[name], warm[name]), name
    assert any(not torch.equal(p, trainer.model.named_trainable_parameters()[n].new_zeros(p.shape))
               for n, p in without.items())
