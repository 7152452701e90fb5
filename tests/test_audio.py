import numpy as np
import pytest
import soundfile as sf

from safe.data.audio import AudioLoadError, audio_info, load_audio, window_starts


@pytest.mark.parametrize("ext,subtype", [("wav", "PCM_16"), ("wav", "FLOAT"), ("flac", "PCM_16"),
                                         ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III")])
@pytest.mark.parametrize("source_rate", [16000, 22050, 44100, 48000])
@pytest.mark.parametrize("target_rate", [16000, 48000])
def test_format_round_trip_and_resample(tmp_path, tone_writer, ext, subtype, source_rate, target_rate):
    path = tmp_path / f"tone.{ext}"
    tone_writer(path, 1.0, source_rate, freq=440.0, channels=2, subtype=subtype)
    audio = load_audio(path, target_rate, 1.0)
    assert audio.dtype == np.float32 and audio.shape == (target_rate,)
    # Mono downmix of channels scaled 0.5 and 1.0 -> amplitude 0.75 * 0.5; compare energy and pitch.
    body = audio[target_rate // 10 : target_rate - target_rate // 10]
    expected_rms = 0.375 / np.sqrt(2)
    assert abs(np.sqrt(np.mean(body**2)) - expected_rms) < 0.05
    spectrum = np.abs(np.fft.rfft(body * np.hanning(len(body))))
    peak_hz = np.argmax(spectrum) * target_rate / len(body)
    assert abs(peak_hz - 440.0) < 5.0


def test_lossless_same_rate_is_exact(tmp_path, tone_writer):
    data = tone_writer(tmp_path / "t.flac", 0.5, 16000, subtype="PCM_24")
    audio = load_audio(tmp_path / "t.flac", 16000, 0.5)
    np.testing.assert_allclose(audio, data[:, 0], atol=1e-6)


def test_short_clip_is_zero_padded_long_clip_cropped(tmp_path, tone_writer):
    tone_writer(tmp_path / "short.wav", 0.25, 16000)
    short = load_audio(tmp_path / "short.wav", 16000, 1.0)
    assert short.shape == (16000,)
    assert np.abs(short[:4000]).max() > 0.4 and np.all(short[4000:] == 0)
    tone_writer(tmp_path / "long.wav", 3.0, 22050)
    assert load_audio(tmp_path / "long.wav", 16000, 1.0).shape == (16000,)


def test_eval_takes_first_window_and_training_crops_are_seeded(tmp_path):
    # A ramp makes the window position visible in the samples.
    ramp = np.linspace(-1, 1, 16000 * 4, dtype=np.float32)
    sf.write(str(tmp_path / "ramp.wav"), ramp, 16000, subtype="FLOAT")
    first = load_audio(tmp_path / "ramp.wav", 16000, 1.0)
    np.testing.assert_array_equal(first, ramp[:16000])
    a = load_audio(tmp_path / "ramp.wav", 16000, 1.0, random_crop=True, rng=np.random.default_rng(7))
    b = load_audio(tmp_path / "ramp.wav", 16000, 1.0, random_crop=True, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    starts = window_starts(16000 * 4, 16000)
    seen = set()
    for seed in range(20):
        crop = load_audio(tmp_path / "ramp.wav", 16000, 1.0, random_crop=True, rng=np.random.default_rng(seed))
        start = int(np.argmin(np.abs(ramp - crop[0])))
        assert start in starts
        np.testing.assert_array_equal(crop, ramp[start : start + 16000])
        seen.add(start)
    assert len(seen) >= 4  # real augmentation: many windows are drawn
    with pytest.raises(ValueError, match="rng"):
        load_audio(tmp_path / "ramp.wav", 16000, 1.0, random_crop=True)


def test_window_starts_cover_the_clip_with_a_bounded_fixed_set():
    assert window_starts(100, 100) == [0] and window_starts(50, 100) == [0]
    starts = window_starts(16000 * 4, 16000)
    assert starts[0] == 0 and starts[-1] == 16000 * 3 and len(starts) == 7
    assert all(b - a <= 8000 for a, b in zip(starts, starts[1:]))  # half-overlapping windows
    assert len(window_starts(48000 * 600, 48000 * 10)) == 8  # a long recording: at most 8 windows


def test_missing_corrupt_empty_and_nan_files_raise(tmp_path, tone_writer):
    with pytest.raises(AudioLoadError, match="does not exist"):
        load_audio(tmp_path / "missing.wav", 16000, 1.0)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    with pytest.raises(AudioLoadError, match="cannot decode"):
        load_audio(tmp_path / "corrupt.wav", 16000, 1.0)
    (tmp_path / "zero.flac").write_bytes(b"")
    with pytest.raises(AudioLoadError):
        load_audio(tmp_path / "zero.flac", 16000, 1.0)
    sf.write(str(tmp_path / "empty.wav"), np.zeros((0,), dtype=np.float32), 16000)
    with pytest.raises(AudioLoadError, match="no samples"):
        load_audio(tmp_path / "empty.wav", 16000, 1.0)
    nan = np.full(1600, np.nan, dtype=np.float32)
    sf.write(str(tmp_path / "nan.wav"), nan, 16000, subtype="FLOAT")
    with pytest.raises(AudioLoadError, match="NaN"):
        load_audio(tmp_path / "nan.wav", 16000, 1.0)


def test_audio_info(tmp_path, tone_writer):
    tone_writer(tmp_path / "i.flac", 2.0, 22050, channels=2)
    info = audio_info(tmp_path / "i.flac")
    assert (info.frames, info.sample_rate, info.channels) == (44100, 22050, 2)
    assert info.duration == pytest.approx(2.0)
