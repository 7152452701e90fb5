"""The encoder registry: an encoder's kind comes from its checkpoint's own config, and its sample rate is known
before any weights load (the data layer needs it first)."""

from __future__ import annotations

import json

import pytest
from helpers.local_run import save_clap

from safe.core.errors import SafeError
from safe.models.audio_encoders import TinyConvEncoder
from safe.models.encoder_registry import ENCODERS, encoder_kind, sample_rate
from safe.training.config import RunConfig, build_config
from safe.training.model_factory import audio_settings


def save_whisper(folder):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    WhisperModel(WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=16,
                               max_source_positions=1500, vocab_size=64, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, decoder_start_token_id=1)).save_pretrained(folder)
    WhisperFeatureExtractor(feature_size=16).save_pretrained(folder)
    return folder


def test_a_local_checkpoint_is_known_by_its_config_not_its_folder_name(tmp_path):
    # Each folder is named after the other kind: a name must never decide.
    clap = save_clap(tmp_path / "whisper-like-name", seed=0)
    whisper = save_whisper(tmp_path / "clap-like-name")
    tiny = tmp_path / "my-encoder"
    TinyConvEncoder(seed=3, sample_rate=8000, clip_seconds=2.0).save(tiny)
    assert encoder_kind(str(clap)) == "clap"
    assert encoder_kind(str(whisper)) == "whisper"
    assert encoder_kind(str(tiny)) == "tiny"
    # The data layer's rate comes from the checkpoint's own extractor settings, else the kind's.
    assert sample_rate("clap", str(clap)) == 16000           # this small CLAP's extractor runs at 16 kHz
    assert sample_rate("whisper", str(whisper)) == 16000
    assert sample_rate("tiny", str(tiny)) == 8000
    assert sample_rate("clap") == ENCODERS["clap"].sample_rate == 48000


def test_a_run_config_naming_a_folder_gets_that_folders_kind_and_rate(tmp_path):
    whisper = save_whisper(tmp_path / "clap-htsat-copy")
    config = build_config(cli_values={"preset": "llava-1.5-7b", "audio_encoder": str(whisper)})
    preset = config.model
    assert (preset.audio_encoder, preset.audio_encoder_path) == ("whisper", str(whisper))
    assert audio_settings(config) == (16000, preset.clip_seconds) == (16000, 10.0)
    # config.json records the kind and the folder; reading it back gives the same model.
    assert RunConfig.from_dict(config.to_dict()).model == preset


def test_known_hub_families_need_no_network_and_others_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert encoder_kind("openai/whisper-large-v3") == "whisper"
    assert encoder_kind("laion/clap-htsat-fused") == "clap"
    assert encoder_kind("tiny") == "tiny"
    with pytest.raises(SafeError, match="Cannot tell which kind of audio encoder 'someone/my-encoder-x' is"):
        encoder_kind("someone/my-encoder-x")


def test_bad_encoder_folders_are_refused_with_a_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafeError, match="has no config.json"):
        encoder_kind(str(tmp_path / "empty"))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(SafeError, match="is a 'bert' model; SAFE reads CLAP and Whisper checkpoints"):
        encoder_kind(str(bert))
    with pytest.raises(SafeError, match="Unknown audio encoder 'wav2vec'"):
        sample_rate("wav2vec")
