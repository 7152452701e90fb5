"""Shared test set-up: offline hub, small deterministic fixtures written as real files."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402


def write_tone(path: Path, seconds: float, sample_rate: int, freq: float = 440.0, channels: int = 1,
               subtype: str | None = None) -> np.ndarray:
    """Write a real sine tone with soundfile; returns the samples written (frames x channels)."""
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    mono = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    data = np.stack([mono * (c + 1) / channels for c in range(channels)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sample_rate, subtype=subtype)
    return data


@pytest.fixture
def tone_writer():
    return write_tone


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A small synthesised toy world shared by the data tests (read-only for tests)."""
    from safe.toy.world import synthesize_toy_world

    out = tmp_path_factory.mktemp("toy_world")
    synthesize_toy_world(out, seed=0, size="small")
    return out
