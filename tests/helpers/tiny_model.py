"""A small untrained SAFE model (tiny LLaVA + tiny conv encoder built from configs) and a real optimizer state, for
tests that write and read checkpoints."""

import torch

from safe.models.audio_encoders import TinyConvEncoder
from safe.models.presets import get_preset
from safe.models.safe_model import SAFEModel
from safe.models.tiny_base import build_processor, build_tokenizer, build_untrained

CORPUS = ["USER: <image>\nwhat color? ASSISTANT:", "USER: Describe the sound. ASSISTANT:", "a dog barks red green blue"]


def tiny_safe_model() -> SAFEModel:
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CORPUS)
    base = build_untrained(tokenizer, seed=0)
    return SAFEModel(base, build_processor(tokenizer), TinyConvEncoder(seed=0, clip_seconds=1.0),
                     get_preset("tiny", clip_seconds=1.0), base_name="test-tiny")


def trainer_state(model: SAFEModel, step: int = 1) -> dict:
    """What the trainer checkpoints, in miniature: the step and an AdamW state after one update."""
    optimizer = torch.optim.AdamW(list(model.named_trainable_parameters().values()), lr=1e-3)
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return {"step": step, "optimizer": optimizer.state_dict()}
