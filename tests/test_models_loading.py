"""Presets and the from_pretrained loading path (hub ids and local folders), offline."""

from __future__ import annotations

import pytest
import torch

from safe.core.errors import SafeError
from safe.models.factory import build_safe_model, count_parameters
from safe.models.presets import default_xattn_layers, get_preset
from safe.models.tiny_base import build_processor, build_tokenizer, build_untrained

CORPUS = ["USER: <image>\nAnswer the question using a single word or phrase. ASSISTANT:",
          "USER: Describe the sound. ASSISTANT:", "what color is the circle? red blue yes no"]


def test_presets_and_aliases():
    assert get_preset("full").preset == "llava-1.5-13b"
    assert get_preset("demo").preset == "tiny"
    assert get_preset("llava-1.5-7b").base_model == "llava-hf/llava-1.5-7b-hf"
    assert get_preset("llava-1.5-7b", base_model=None).base_model == "llava-hf/llava-1.5-7b-hf"   # unset flag
    assert get_preset("tiny").num_audio_tokens == 8 and get_preset("llava-1.5-13b").num_audio_tokens == 16
    assert get_preset("llava-1.5-7b", audio_encoder="whisper").encoder_path == "openai/whisper-small"
    with pytest.raises(SafeError, match="Unknown model config"):
        get_preset("llava-2")
    with pytest.raises(SafeError, match="fusion"):
        get_preset("tiny", fusion="concat")
    assert default_xattn_layers(32, 3) == (8, 16, 24)
    assert default_xattn_layers(40, 3) == (10, 20, 30)
    assert default_xattn_layers(4, 2) == (1, 3)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """A tiny LLaVA and a tiny CLAP written with save_pretrained, as a user's local copies would be."""
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    root = tmp_path_factory.mktemp("hub")
    tokenizer = build_tokenizer(CORPUS)
    base = build_untrained(tokenizer, seed=0)
    base.save_pretrained(root / "llava")
    build_processor(tokenizer).save_pretrained(root / "llava")
    audio = ClapAudioConfig(patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32,
                            projection_dim=16, spec_size=64, window_size=4, num_mel_bins=16, patch_size=4,
                            patch_stride=[4, 4], enable_fusion=False)
    text = ClapTextConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=32, projection_dim=16)
    torch.manual_seed(0)
    ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)) \
        .save_pretrained(root / "clap")
    ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1, fft_window_size=256,
                         truncation="rand_trunc").save_pretrained(root / "clap")
    return root, base


def test_local_llava_and_clap_load_through_the_hub_code_path(saved_models):
    root, base = saved_models
    preset = get_preset("llava-1.5-7b", base_model=str(root / "llava"), audio_encoder="clap",
                        audio_encoder_path=str(root / "clap"), clip_seconds=1.0, num_audio_tokens=4,
                        xattn_heads=4)
    model = build_safe_model(preset, device="cpu")
    assert model.audio_encoder.sample_rate == 16000 and model.audio_encoder.feature_dim == 32
    assert model.fusion.layer_ids == default_xattn_layers(4, 3)
    waves = torch.randn(2, 16000) * 0.1
    features = model.audio_features(waves)
    assert features.ndim == 3 and features.shape[0] == 2 and features.shape[2] == 32 and features.shape[1] > 1
    batch = model.builder.caption_batch(waves, ["red circle", "blue"])
    with torch.no_grad():
        reference = base(**model.base_inputs(batch)).logits
        assert torch.equal(model(batch, gate=0.0).logits, reference)
        with torch.no_grad():
            for adapter in model.fusion.adapters.values():
                adapter.alpha.fill_(0.5)
        assert not torch.equal(model(batch, gate=1.0).logits, reference)
    assert model.generate(model.builder.caption_batch(waves), max_new_tokens=3) is not None


def test_pooled_clap_gives_one_vector_per_clip(saved_models):
    root, _ = saved_models
    preset = get_preset("tiny", audio_encoder="clap", audio_encoder_path=str(root / "clap"), audio_features="pooled",
                        clip_seconds=1.0)
    from safe.models.factory import load_audio_encoder

    encoder = load_audio_encoder(preset)
    assert encoder(torch.randn(3, 16000)).shape == (3, 1, 32)
    assert all(not p.requires_grad for p in encoder.parameters())


def test_wrong_checkpoint_kind_is_refused(saved_models):
    root, _ = saved_models
    with pytest.raises(SafeError, match="could not be loaded as|is not a"):
        build_safe_model(get_preset("llava-1.5-7b", base_model=str(root / "clap")))


def test_offline_missing_hub_model_is_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SafeError) as err:
        build_safe_model(get_preset("llava-1.5-7b", base_model="safe-tests-nobody/no-such-llava"))
    message = str(err.value)
    assert "safe-tests-nobody/no-such-llava" in message and "--base-model PATH" in message
    assert message.count(". ") == 0 and "\n" not in message


def test_missing_local_path_names_the_flag(tmp_path, saved_models):
    root, _ = saved_models
    with pytest.raises(SafeError, match="--base-model"):
        build_safe_model(get_preset("llava-1.5-7b", base_model=str(tmp_path / "nope")))
    with pytest.raises(SafeError, match="--audio-encoder"):
        build_safe_model(get_preset("llava-1.5-7b", base_model=str(root / "llava"),
                                    audio_encoder_path=str(tmp_path / "no-clap")))


def test_real_preset_parameter_counts_on_meta():
    counts = count_parameters(get_preset("llava-1.5-7b"))
    assert 7.0e9 < counts["frozen"] < 7.2e9                 # LLaVA-1.5-7B + CLAP audio tower
    assert counts["trainable"] == counts["projector"] + counts["xattn"] and counts["lora"] == 0
    assert count_parameters(get_preset("llava-1.5-7b", lora_rank=8))["lora"] == 32 * 2 * 8 * (4096 + 4096)


def test_llava_presets_use_llava_1_5_prompt_and_square_padding_and_tiny_does_not(saved_models):
    import numpy as np
    from PIL import Image

    from safe.models.prompts import TINY, VICUNA_SYSTEM

    root, _ = saved_models
    common = dict(base_model=str(root / "llava"), audio_encoder="clap", audio_encoder_path=str(root / "clap"),
                  clip_seconds=1.0, num_audio_tokens=4, xattn_heads=4)
    model = build_safe_model(get_preset("llava-1.5-7b", **common), device="cpu")
    assert model.builder.style.system == VICUNA_SYSTEM
    assert model.builder.caption_prompt().startswith(VICUNA_SYSTEM + " USER:")
    assert model.builder.vqa_prompt("q?").startswith(VICUNA_SYSTEM + " USER: <image>")
    processor = model.builder.image_processor
    assert processor.do_pad
    # A wide image: padded to square with the mean colour (normalised to ~0), not centre-cropped.
    wide = Image.fromarray(np.full((24, 48, 3), 255, dtype=np.uint8))
    pixels = processor(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert pixels[:, 0, 24].abs().max() < 0.02 and pixels[:, 24, 24].min() > 1.0   # top band padded, middle white
    batch = model.builder.vqa_batch([wide], ["q?"])
    assert torch.equal(batch.pixel_values[0], pixels)

    plain = build_safe_model(get_preset("llava-1.5-7b", system_prompt=False, pad_to_square=False, **common))
    assert plain.builder.vqa_prompt("q?").startswith("USER: <image>")
    assert not getattr(plain.builder.image_processor, "do_pad", False)
    assert plain.builder.image_processor(images=[wide], return_tensors="pt")["pixel_values"][0][:, 0, 24].min() > 1.0

    tiny = get_preset("tiny")
    assert tiny.prompt_style == "tiny" and not tiny.pad_to_square
    from safe.models.prompts import get_style

    assert get_style(tiny.prompt_style, tiny.system_prompt) == TINY


def test_processor_without_patch_size_still_counts_image_tokens_and_a_wrong_size_is_one_sentence(saved_models,
                                                                                                 tmp_path):
    """Older llava-hf exports lack patch_size / num_additional_image_tokens in processor_config.json: the image token
    count comes from the model's vision config instead, so such a folder just works."""
    import json
    import shutil

    root, _ = saved_models
    common = dict(audio_encoder="clap", audio_encoder_path=str(root / "clap"), clip_seconds=1.0, num_audio_tokens=4,
                  xattn_heads=4)
    old = tmp_path / "old-llava"
    shutil.copytree(root / "llava", old)
    config_path = old / "processor_config.json"
    config = json.loads(config_path.read_text())
    config.pop("patch_size", None)
    config.pop("num_additional_image_tokens", None)
    config_path.write_text(json.dumps(config))
    model = build_safe_model(get_preset("llava-1.5-7b", base_model=str(old), **common))
    assert model.builder.num_image_tokens == 9                      # 48 px / 16 px patches, CLS dropped
    from PIL import Image

    batch = model.builder.vqa_batch([Image.new("RGB", (48, 48))], ["q?"])
    assert len(model.generate(batch, gate=0.0, max_new_tokens=2)) == 1

    wrong = tmp_path / "wrong-size"
    shutil.copytree(root / "llava", wrong)
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = wrong / name
        if path.is_file():
            data = json.loads(path.read_text())
            target = data.get("image_processor", data)
            if "crop_size" in target:
                target["crop_size"] = {"height": 64, "width": 64}
                target["size"] = {"shortest_edge": 64}
            path.write_text(json.dumps(data))
    with pytest.raises(SafeError, match="64 px images but its vision tower expects 48 px") as err:
        build_safe_model(get_preset("llava-1.5-7b", base_model=str(wrong), **common))
    assert "\n" not in str(err.value)
