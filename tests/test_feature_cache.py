"""Frozen audio-feature cache (DESIGN §10): exact reuse, invalidation, corrupt-entry recovery, and that training
gives the same result with and without it. Real audio files, the real tiny encoder."""

import os

import numpy as np
import pytest
import soundfile as sf
import torch

from safe.data.audio import load_audio, window_starts
from safe.data.datasets import AudioCapsDataset, collate_samples
from safe.data.feature_cache import FeatureCache
from safe.models.audio_encoders import TinyConvEncoder
from safe.training.features import batch_features


@pytest.fixture(scope="module")
def encoder():
    return TinyConvEncoder(seed=0)


def fresh(encoder, path, window=0):
    audio = load_audio(path, encoder.sample_rate, encoder.clip_seconds, window_index=window)
    return encoder(torch.from_numpy(audio)[None])[0]


def make_cache(root, encoder):
    return FeatureCache(root, encoder.encoder_id, encoder.sample_rate, encoder.clip_seconds)


def entry_files(root):
    return sorted(p for p in root.rglob("*.safetensors"))


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
    assert torch.equal(second, encoder(collate_samples(items)["audio"]))
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
    make_cache(tmp_path / "cache", encoder).put(clip, 0, fresh(encoder, clip))
    assert make_cache(tmp_path / "cache", encoder).get(clip, 0) is not None
    other = TinyConvEncoder(seed=1)
    assert other.encoder_id != encoder.encoder_id
    assert make_cache(tmp_path / "cache", other).get(clip, 0) is None
    # Same encoder id but another crop length or rate: another entry too.
    assert FeatureCache(tmp_path / "cache", encoder.encoder_id, 16000, 2.0).get(clip, 0) is None
    assert FeatureCache(tmp_path / "cache", encoder.encoder_id, 48000, 4.0).get(clip, 0) is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "nan"])
def test_corrupt_entry_is_deleted_and_recomputed(tmp_path, tone_writer, encoder, damage):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    root = tmp_path / "cache"
    cache = make_cache(root, encoder)
    expected = fresh(encoder, clip)
    cache.put(clip, 0, expected)
    (entry,) = entry_files(root)
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(np.random.default_rng(0).bytes(len(data)))
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a well-formed file whose values are not finite
        from safetensors.torch import save_file

        from safe.data.feature_cache import checksum

        nan = torch.full(expected.shape, float("nan"))
        save_file({"features": nan}, str(entry), metadata={"key": cache.key(clip, 0), "crc32": checksum(nan)})
    assert cache.get(clip, 0) is not None  # this process still holds the entry in memory ...
    cache = make_cache(root, encoder)       # ... a new one (the next run, a loader worker) reads the disk
    assert cache.get(clip, 0) is None
    assert not entry.exists()  # detected and deleted
    # The loader then recomputes: the dataset hands out audio again, and the entry is rewritten.
    cache.put(clip, 0, fresh(encoder, clip))
    assert torch.equal(cache.get(clip, 0), expected)


def test_entry_of_another_key_is_rejected(tmp_path, tone_writer, encoder):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    tone_writer(a, 2.0, 16000, freq=300.0)
    tone_writer(b, 2.0, 16000, freq=600.0)
    root = tmp_path / "cache"
    cache = make_cache(root, encoder)
    cache.put(a, 0, fresh(encoder, a))
    cache.put(b, 0, fresh(encoder, b))
    file_a, file_b = cache._file(cache.key(a, 0)), cache._file(cache.key(b, 0))
    file_a.write_bytes(file_b.read_bytes())  # b's entry under a's name
    cache = make_cache(root, encoder)        # a new process: nothing in memory
    assert cache.get(a, 0) is None and not file_a.exists()
    assert torch.equal(cache.get(b, 0), fresh(encoder, b))


def test_a_flipped_bit_fails_the_checksum_is_counted_and_recomputed(tmp_path, tone_writer, encoder, capsys):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    root = tmp_path / "cache"
    expected = fresh(encoder, clip)
    make_cache(root, encoder).put(clip, 0, expected)
    (entry,) = entry_files(root)
    data = bytearray(entry.read_bytes())
    values_start = 8 + int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, then values
    data[values_start + 401] ^= 0x01  # one low mantissa bit of one value: still a finite, plausible feature
    entry.write_bytes(bytes(data))
    cache = make_cache(root, encoder)  # a new process: nothing in memory
    assert cache.get(clip, 0) is None  # a miss, so the loader decodes and encodes the clip again
    assert cache.rejected == 1 and not entry.exists()
    assert f"{entry} fails its checksum" in capsys.readouterr().err
    cache.put(clip, 0, fresh(encoder, clip))
    assert torch.equal(make_cache(root, encoder).get(clip, 0), expected)


def test_an_entry_without_a_checksum_is_recomputed(tmp_path, tone_writer, encoder):
    from safetensors.torch import save_file

    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000)
    cache = make_cache(tmp_path / "cache", encoder)
    file = cache._file(cache.key(clip, 0))
    file.parent.mkdir(parents=True)
    # The format before checksums: the key only.
    save_file({"features": fresh(encoder, clip).contiguous()}, str(file), metadata={"key": cache.key(clip, 0)})
    assert cache.get(clip, 0) is None and cache.rejected == 1 and not file.exists()


def test_memory_layer_serves_repeats_and_still_misses_a_changed_file(tmp_path, tone_writer, encoder):
    clip = tmp_path / "a.wav"
    tone_writer(clip, 2.0, 16000, freq=440.0)
    root = tmp_path / "cache"
    cache = make_cache(root, encoder)
    expected = fresh(encoder, clip)
    cache.put(clip, 0, expected)
    (entry,) = entry_files(root)
    entry.unlink()                               # served from memory, no file read
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
    assert len(cache._memory) == 2 and cache._memory_used <= cache.memory_bytes  # the oldest was evicted
    assert all(torch.equal(cache.get(c, 0), f) for c, f in zip(clips, features))  # the evicted one from disk
    off = FeatureCache(tmp_path / "cache", encoder.encoder_id, 16000, 4.0, memory_mb=0)
    assert torch.equal(off.get(clips[0], 0), features[0]) and not off._memory


def test_entries_held_in_memory_do_not_keep_their_files_mapped(tmp_path, tone_writer, encoder):
    clips = [tmp_path / f"{i}.wav" for i in range(5)]
    for i, clip in enumerate(clips):
        tone_writer(clip, 2.0, 16000, freq=300.0 + 50 * i)
        make_cache(tmp_path / "cache", encoder).put(clip, 0, fresh(encoder, clip))
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
    from safe.config import build_config
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
    assert list((tmp_path / "features").rglob("*.safetensors"))
    warm, _ = train(True, "warm", steps)         # reads it back
    for name in without:
        assert torch.equal(without[name], cold[name]), name
        assert torch.equal(without[name], warm[name]), name
    assert any(not torch.equal(p, trainer.model.named_trainable_parameters()[n].new_zeros(p.shape))
               for n, p in without.items())
