"""A run folder as `safe train` leaves it, made without training: a llava-1.5-7b-preset model whose base is a small
untrained LLaVA saved with save_pretrained (a user's local copy, loaded through the real from_pretrained path), the
tiny conv audio encoder, trainable weights moved off their identity init, a real checkpoint, metrics and config."""

from pathlib import Path

import torch
from helpers.tiny_model import trainer_state

from safe.models.tiny_base import build_processor, build_tokenizer, build_untrained
from safe.training.checkpoint import save_checkpoint
from safe.training.config import build_config
from safe.training.model_factory import build_model
from safe.training.outputs import write_json_atomic

CORPUS = ["USER: <image>\nAnswer the question using a single word or phrase. ASSISTANT:",
          "USER: Describe the sound. ASSISTANT:", "a dog barks red green blue circle"]
COMMAND = "safe train --variant soft_retention --model-config llava-1.5-7b --base-model BASE --audio-encoder tiny"
STEP = 5
VALIDATION = {"step": STEP, "audio_cider": 61.25, "audio_cider_muted": 3.5, "audio_cider_shuffled": 20.0,
              "audio_listen_gain": 41.25, "audio_samples": 16, "audio_spider": None, "audio_meteor": 30.5,
              "vl_base_accuracy": 90.0, "vl_safe_accuracy": 90.0, "vl_safe_distractor_accuracy": 86.67,
              "vl_distractor_delta": -3.33, "vl_samples": 30, "gate0_exact": True}


def save_base(folder: Path, seed: int) -> Path:
    tokenizer = build_tokenizer(CORPUS)
    build_untrained(tokenizer, seed=seed).save_pretrained(folder)
    build_processor(tokenizer).save_pretrained(folder)
    return folder


def save_clap(folder: Path, seed: int) -> Path:
    """A small CLAP (audio and text towers) with its feature extractor, as a local copy of a hub CLAP would be."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    audio = ClapAudioConfig(patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32,
                            projection_dim=16, spec_size=64, window_size=4, num_mel_bins=16, patch_size=4,
                            patch_stride=[4, 4], enable_fusion=False)
    text = ClapTextConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, projection_dim=16)
    torch.manual_seed(seed)
    ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)) \
        .save_pretrained(folder)
    ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1, fft_window_size=256,
                         truncation="rand_trunc").save_pretrained(folder)
    return folder


def make_run(root: Path, audio_encoder: str = "tiny") -> tuple[Path, Path]:
    """(run folder, base folder) under ``root``; ``audio_encoder``: tiny, or a local encoder folder."""
    base = save_base(root / "llava", seed=0)
    config = build_config(cli_values={"model_config": "llava-1.5-7b", "base_model": str(base),
                                      "audio_encoder": audio_encoder,
                                      "variant": "soft_retention", "data_root": str(root / "data"),
                                      "output_root": str(root / "runs")})
    model = build_model(config, torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.trainable_parameters():  # open the gates and move every weight: logits differ from base
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    run = root / "runs" / "20260101_000000_soft_retention"
    write_json_atomic(run / "config.json", {"config": config.to_dict(),
                                             "environment": {"command": COMMAND.replace("BASE", str(base))},
                                             "distributed": {"world_size": 1, "global_batch_size": 8}})
    save_checkpoint(run, STEP, model, trainer_state(model, STEP), {"variant": "soft_retention"})
    write_json_atomic(run / "metrics.json", {"validation": VALIDATION, "history": [VALIDATION],
                                             "training": {"variant": "soft_retention", "step": STEP},
                                             "throughput": {}})
    return run, base
