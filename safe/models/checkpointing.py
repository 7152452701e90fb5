"""Activation checkpointing of the frozen decoder layers, for long sequences or big batches.

The gradient of the audio path flows back through every decoder layer above the first adapter, so a training
step stores those layers' activations. With checkpointing on, each decoder layer's forward runs under
non-reentrant `torch.utils.checkpoint`: its activations are dropped after the forward and recomputed during the
backward, trading one extra layer forward for the memory. Gradients are unchanged (recomputation replays the
same kernels on the same inputs).

Written by hand rather than with transformers' `gradient_checkpointing_enable()` because SAFE switches state
per forward: the xattn adapters run in forward hooks, which must stay outside the recomputed region (the hook's
audio tokens are unbound once the SAFE forward returns), and LoRA is switched on only inside the SAFE forward,
so the recomputation restores the LoRA state its forward saw. Only steps that build a graph are checkpointed;
no-grad forwards (the teacher, generation) run the layers as usual.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from safe.models.fusion import decoder_layers


def enable_activation_checkpointing(model) -> int:
    """Checkpoint every decoder layer of ``model.base`` (a SAFEModel); returns how many layers were wrapped."""
    if getattr(model, "activation_checkpointing", False):
        return 0
    layers = decoder_layers(model.base)
    for layer in layers:
        layer.forward = _checkpointed(layer.forward, model.lora)
    model.activation_checkpointing = True
    return len(layers)


def disable_activation_checkpointing(model) -> None:
    """Undo enable_activation_checkpointing (the layers' own forward methods again)."""
    if getattr(model, "activation_checkpointing", False):
        for layer in decoder_layers(model.base):
            del layer.forward  # the instance attribute set above; the class's forward shows through again
        model.activation_checkpointing = False


def _checkpointed(forward, lora):
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            lora_on = lora.on if lora is not None else False
            return checkpoint(_replay, forward, lora, lora_on, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def _replay(forward, lora, lora_on: bool, *args, **kwargs):
    """The layer's forward with LoRA as it was when the step ran (the backward's recomputation may come after
    the SAFE path switched LoRA off again)."""
    if lora is None or lora.on == lora_on:
        return forward(*args, **kwargs)
    with lora.enabled(lora_on):
        return forward(*args, **kwargs)
