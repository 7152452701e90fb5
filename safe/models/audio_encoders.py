"""Frozen audio encoders: waveforms [B, S] at the encoder's own rate -> features [B, T, D].

Every encoder declares ``sample_rate`` and ``clip_seconds`` so the data layer resamples and crops
once, and an ``encoder_id`` string that names its weights and settings (the feature cache keys on
it). Encoders are frozen: eval mode forever, no gradients, outputs computed under ``no_grad``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from safe.core.errors import SafeError


class FrozenAudioEncoder(nn.Module):
    """Base class: subclasses implement ``_encode`` and set the four attributes below."""

    sample_rate: int
    clip_seconds: float
    feature_dim: int
    encoder_id: str

    def freeze(self) -> "FrozenAudioEncoder":
        for param in self.parameters():
            param.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FrozenAudioEncoder":
        # Frozen means frozen: model.train() on the SAFE model must not switch on dropout/batch-norm updates here.
        return super().train(False)

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.dim() != 2:
            raise ValueError(f"expected waveforms [batch, samples], got shape {tuple(waveforms.shape)}")
        return self._encode(waveforms.float())

    def _encode(self, waveforms: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- tiny


class TinyConvEncoder(FrozenAudioEncoder):
    """A random, frozen 3-layer Conv1d over a 64-bin log-mel spectrogram (the tiny preset's encoder).

    Random convolutions over log-mel keep pitch, rhythm and loudness patterns apart well enough for
    the toy world (a prototype measured it stronger than a tiny random CLAP). Weights come from
    ``seed`` alone, so the encoder is reproducible; the tiny base cache also stores them.
    """

    mel: torch.Tensor      # buffers, registered in __init__
    window: torch.Tensor

    def __init__(self, seed: int = 0, sample_rate: int = 16000, clip_seconds: float = 4.0, n_mels: int = 64,
                 channels: int = 128, n_fft: int = 512, hop_length: int = 160):
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        self.config = dict(seed=seed, sample_rate=sample_rate, clip_seconds=clip_seconds, n_mels=n_mels,
                           channels=channels, n_fft=n_fft, hop_length=hop_length)
        self.sample_rate, self.clip_seconds, self.feature_dim = sample_rate, clip_seconds, channels
        self.n_fft, self.hop_length = n_fft, hop_length
        mel = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=20.0,
                              max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney",
                              mel_scale="slaney")
        self.register_buffer("mel", torch.tensor(mel, dtype=torch.float32), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        convs = [
            nn.Conv1d(n_mels, channels, kernel_size=5, stride=2, padding=2),
            nn.Conv1d(channels, channels, kernel_size=5, stride=2, padding=2),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
        ]
        self.convs = nn.ModuleList(convs)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in convs:
                fan_in = conv.in_channels * conv.kernel_size[0]
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
                assert conv.bias is not None  # Conv1d's default bias=True
                conv.bias.zero_()
        self.encoder_id = "tiny-conv:" + json.dumps(self.config, sort_keys=True)
        self.freeze()

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveforms, self.n_fft, self.hop_length, window=self.window, return_complex=True)
        power = spec.abs() ** 2                                   # [B, F, frames]
        mel = torch.einsum("bft,fm->bmt", power, self.mel)
        log = torch.log10(mel.clamp(min=1e-10))
        # Whisper-style dynamic-range clamp and scaling: features of a clip land in about [-1, 1].
        log = torch.maximum(log, log.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (log + 4.0) / 4.0

    def _encode(self, waveforms: torch.Tensor) -> torch.Tensor:
        hidden = self.log_mel(waveforms.to(self.window.device))
        for conv in self.convs:
            hidden = torch.nn.functional.gelu(conv(hidden))
        return hidden.transpose(1, 2)                             # [B, T, D]

    # The tiny base cache stores the encoder next to the LLaVA so a run can always name its exact weights.
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(self.config, indent=1, sort_keys=True))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))

    @classmethod
    def load(cls, directory: Path) -> "TinyConvEncoder":
        from safetensors.torch import load_file

        directory = Path(directory)
        encoder = cls(**json.loads((directory / "config.json").read_text()))
        encoder.load_state_dict(load_file(str(directory / "model.safetensors")))
        encoder.freeze()
        return encoder


# ---------------------------------------------------------------------------------------------- CLAP


class ClapEncoder(FrozenAudioEncoder):
    """CLAP (HTS-AT) audio tower. ``features="patch"``: the final patch grid as a sequence
    [B, F*T, 768]; ``"pooled"``: one vector per clip [B, 1, 768] (measured on the toy world: too little on its own)."""

    def __init__(self, model, feature_extractor, name: str, features: str = "patch", clip_seconds: float = 10.0):
        super().__init__()
        if features not in ("patch", "pooled"):
            raise SafeError(f"Unknown CLAP feature mode {features!r}; use 'patch' or 'pooled'.")
        self.model, self.feature_extractor, self.features = model, feature_extractor, features
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.clip_seconds = float(clip_seconds)
        self.feature_dim = int(model.config.hidden_size)
        # The unfused checkpoint takes one 10 s crop; "fusion" truncation builds 4 crops it can't read.
        self.truncation = "fusion" if model.config.enable_fusion else "rand_trunc"
        self.encoder_id = f"clap:{name}:{features}:{self.sample_rate}:{self.clip_seconds}"
        self.freeze()

    def _encode(self, waveforms: torch.Tensor) -> torch.Tensor:
        arrays = [w.detach().cpu().numpy().astype(np.float32) for w in waveforms]
        inputs = self.feature_extractor(arrays, sampling_rate=self.sample_rate, return_tensors="pt",
                                        truncation=self.truncation, padding="repeatpad")
        dtype = next(self.model.parameters()).dtype
        out = self.model(input_features=inputs["input_features"].to(self.device, dtype),
                         is_longer=inputs["is_longer"].to(self.device))
        if self.features == "pooled":
            return out.pooler_output.unsqueeze(1)
        hidden = out.last_hidden_state                            # [B, D, freq, time]
        return hidden.flatten(2).transpose(1, 2)


# ------------------------------------------------------------------------------------------- Whisper


class WhisperEncoderWrapper(FrozenAudioEncoder):
    """Whisper encoder: a 30 s log-mel window (the model's fixed input), keeping only the frames of
    the clip itself (50 frames per second), so zero padding never reaches the projector."""

    def __init__(self, encoder, feature_extractor, name: str, clip_seconds: float = 10.0):
        super().__init__()
        self.encoder, self.feature_extractor = encoder, feature_extractor
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.clip_seconds = float(clip_seconds)
        self.feature_dim = int(encoder.config.d_model)
        self.encoder_id = f"whisper:{name}:{self.sample_rate}:{self.clip_seconds}"
        self.freeze()

    def _encode(self, waveforms: torch.Tensor) -> torch.Tensor:
        arrays = [w.detach().cpu().numpy().astype(np.float32) for w in waveforms]
        inputs = self.feature_extractor(arrays, sampling_rate=self.sample_rate, return_tensors="pt")
        dtype = next(self.encoder.parameters()).dtype
        hidden = self.encoder(inputs["input_features"].to(self.device, dtype)).last_hidden_state
        frames_per_second = hidden.shape[1] / 30.0
        keep = max(1, min(hidden.shape[1], int(math.ceil(self.clip_seconds * frames_per_second))))
        return hidden[:, :keep]
