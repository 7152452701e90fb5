"""LoRA (peft) on the LLM's attention projections, switched on only on the SAFE path.

Adapters are injected in place (``inject_adapter_in_model``), which keeps the base class and
its forward; a disabled LoRA layer calls the original frozen Linear, so the base path stays
bit-identical. Only the language model's layers are targeted, never the vision tower.
"""

from __future__ import annotations

import contextlib

from torch import nn


def attach_lora(base, rank: int, alpha: float | None, targets: tuple[str, ...], dropout: float = 0.0) -> list:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    pattern = r".*language_model\.layers\.\d+\.self_attn\.(" + "|".join(targets) + r")"
    scale = alpha if alpha is not None else 2 * rank
    config = LoraConfig(r=rank, lora_alpha=scale, lora_dropout=dropout,  # type: ignore[arg-type]  # peft: a float
                        target_modules=pattern, bias="none")
    inject_adapter_in_model(config, base)
    layers = [m for m in base.modules() if isinstance(m, LoraLayer)]
    if not layers:
        from safe.core.errors import SafeError
        raise SafeError(f"No LoRA targets {targets} found in the base model's attention layers; "
                        "pass --lora-targets names of its projection modules.")
    return layers


def lora_parameters(base) -> dict[str, nn.Parameter]:
    return {name: p for name, p in base.named_parameters() if ".lora_" in name}


class LoraSwitch:
    """Enable/disable all LoRA layers without touching the requires_grad flags peft would flip."""

    def __init__(self, layers: list, params: list[nn.Parameter]):
        self.layers, self.params = layers, params
        self.set(False)

    def set(self, enabled: bool) -> None:
        self.on = enabled
        flags = [p.requires_grad for p in self.params]
        for layer in self.layers:
            layer.enable_adapters(enabled)
        for p, flag in zip(self.params, flags):
            p.requires_grad_(flag)

    @contextlib.contextmanager
    def enabled(self, on: bool = True):
        self.set(on)
        try:
            yield
        finally:
            self.set(False)
