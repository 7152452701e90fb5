"""What a Stage A step holds in memory, from the model's shapes alone: weights, optimizer state, and the activations
autograd keeps for the backward.

The frozen base's weights get no gradient, so a frozen linear layer keeps nothing for the backward (its input is
needed only for a weight gradient); what is kept, per token of a decoder layer that the loss backpropagates through,
is the fp32 input of its two RMSNorms, the attention's q, k, v and output, and the MLP's gate, up and activation
outputs: 8·H + a·(4·H + 3·I) bytes (a: bytes of an activation, 2 in bf16). The loss backpropagates through the layers
after the first adapter (xattn), through every layer with prefix fusion or LoRA. Each xattn adapter keeps
4·H + a·(2·H + 3·D) bytes a token, the cross-entropy 4·V (fp32 log-probabilities). tests/test_dry_run.py checks
the formula against what autograd really saves (saved-tensor hooks) on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2 ** 30


@dataclass(frozen=True)
class StepShapes:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    fusion: str                       # xattn | prefix
    adapter_layers: tuple[int, ...]   # decoder layers followed by an xattn adapter
    xattn_dim: int
    lora_rank: int
    audio_tokens: int
    image_tokens: int
    head_dim: int = 128


def step_shapes(model) -> StepShapes:
    """The shapes of a (meta-device) SAFEModel that set a step's memory."""
    config = model.base.config
    text, vision = config.text_config, config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2 + \
        (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)
    fusion = model.fusion
    return StepShapes(hidden=text.hidden_size, intermediate=text.intermediate_size, layers=text.num_hidden_layers,
                      vocab=text.vocab_size, fusion=model.preset.fusion,
                      adapter_layers=tuple(fusion.layer_ids) if fusion is not None else (),
                      xattn_dim=next(iter(fusion.adapters.values())).q.out_features if fusion is not None else 0,
                      lora_rank=model.preset.lora_rank, audio_tokens=model.preset.num_audio_tokens,
                      image_tokens=image_tokens, head_dim=text.hidden_size // text.num_attention_heads)


def backprop_layers(shapes: StepShapes) -> int:
    """Decoder layers the caption loss backpropagates through."""
    if shapes.fusion == "prefix" or shapes.lora_rank > 0 or not shapes.adapter_layers:
        return shapes.layers
    return shapes.layers - 1 - min(shapes.adapter_layers)


def activation_bytes(shapes: StepShapes, batch: int, seq_len: int, act_bytes: int = 2,
                     loss_positions: int | None = None, checkpointing: bool = False) -> int:
    """Bytes autograd keeps for one micro-batch of ``batch`` rows of ``seq_len`` tokens (prefix fusion adds its
    audio tokens); ``loss_positions`` per row carry the cross-entropy (default: every position). With activation
    checkpointing a layer keeps only its input, and one layer at a time is recomputed in full."""
    h, a = shapes.hidden, act_bytes
    tokens = batch * (seq_len + (shapes.audio_tokens if shapes.fusion == "prefix" else 0))
    layer = recompute_bytes_per_token(shapes, act_bytes)
    # Checkpointed, a layer keeps its input and the rotary cos/sin it was called with.
    kept = a * (h + 2 * shapes.head_dim) if checkpointing else layer
    layers = backprop_layers(shapes) * kept + (layer if checkpointing else 0)
    adapters = len(shapes.adapter_layers) * (4 * h + a * (2 * h + 3 * shapes.xattn_dim))
    loss = batch * (loss_positions if loss_positions is not None else seq_len) * 4 * shapes.vocab
    return tokens * (layers + adapters + 4 * h) + loss


def recompute_bytes_per_token(shapes: StepShapes, act_bytes: int = 2) -> int:
    """One decoder layer's activations, rebuilt during the backward when activation checkpointing is on."""
    h, i, a = shapes.hidden, shapes.intermediate, act_bytes
    return 8 * h + a * (4 * h + 3 * i) + (a * h if shapes.lora_rank else 0)


def logits_bytes(shapes: StepShapes, batch: int, seq_len: int, act_bytes: int = 2) -> int:
    """The full logits of a forward ([B, L, V]), alive while a loss picks its positions out of them."""
    return batch * seq_len * shapes.vocab * act_bytes


def training_state_bytes(trainable: int) -> int:
    """fp32 master weights, gradients and AdamW's two moments: 16 bytes a trainable parameter."""
    return 16 * trainable
