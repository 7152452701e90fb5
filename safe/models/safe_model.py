"""SAFEModel: frozen LLaVA + frozen audio encoder + trained projector and gated fusion (+ optional LoRA).

The one invariant everything else relies on: with gate 0 or no audio, ``forward`` and ``generate``
call the bare base model with exactly the inputs it would get without SAFE (hooks inactive, LoRA
disabled), so its logits are bit-identical to the base's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from safe.core.errors import SafeError
from safe.core.files import atomic_write, atomic_write_text
from safe.models.batching import BatchBuilder, SafeBatch, position_ids_from_mask
from safe.models.fusion import XAttnFusion, is_gate, splice_prefix
from safe.models.lora import LoraSwitch, attach_lora, lora_parameters
from safe.models.presets import ModelConfig, default_xattn_layers
from safe.models.projector import AudioProjector
from safe.models.prompts import IGNORE_INDEX, get_style

TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "safe_config.json"
FORMAT = "safe-trainable-1"


@dataclass
class SafeOutput:
    logits: torch.Tensor                  # [B, L(+k in prefix mode), V]
    labels: torch.Tensor | None           # aligned with logits (IGNORE_INDEX off the answers)
    loss: torch.Tensor | None = None
    safe_path: bool = False               # False: this was the bare base model

    def answer_logits(self) -> torch.Tensor:
        """Logits that predict each answer token, [N, V], in batch order: the same N for any fusion
        mode and for the base, so teacher and student can be compared position by position."""
        if self.labels is None:
            raise ValueError("answer_logits needs a batch with labels")
        keep = self.labels[:, 1:] != IGNORE_INDEX
        return self.logits[:, :-1][keep]


def num_image_tokens(base_config, processor) -> int:
    """Image tokens per image: what the vision tower produces for LLaVA's feature-selection strategy.

    Taken from the model's own config (patches of the vision tower, the CLS token dropped by the "default"
    strategy), not from processor_config.json, whose patch_size / num_additional_image_tokens older llava-hf exports
    lack. The processor must only make images of the size the tower was built for."""
    vision = base_config.vision_config
    count = (vision.image_size // vision.patch_size) ** 2
    if base_config.vision_feature_select_strategy == "full":
        count += 1
    image = processor.image_processor
    crop = (getattr(image, "crop_size", None) if getattr(image, "do_center_crop", True) else None) or image.size
    side = crop.get("height", crop.get("shortest_edge"))
    if side != vision.image_size:
        raise SafeError(f"The base model's image processor makes {side} px images but its vision tower expects "
                        f"{vision.image_size} px; use the processor saved with the model (crop_size "
                        f"{vision.image_size}).")
    return count


def base_fingerprint(base) -> dict:
    """Architecture numbers plus a signature of the word embeddings: a checkpoint trained on one
    base must not be loaded onto another (same shapes, different weights). The signature is a few
    normalised random projections, stable across bf16/fp32 loading (~1e-3) but ~N(0,1) apart for
    different weights."""
    cfg = base.config.text_config
    info = {"model_type": base.config.model_type, "text_model_type": cfg.model_type,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
            "vocab_size": cfg.vocab_size, "signature": None}
    weight = base.get_input_embeddings().weight
    if weight.device.type != "meta":
        flat = weight.detach().flatten()[: 1 << 20].float()
        probes = torch.randn(4, flat.numel(), generator=torch.Generator().manual_seed(20240917)).to(flat.device)
        info["signature"] = [round(float(v), 4) for v in (probes @ flat) / (flat.norm() + 1e-12)]
    return info


def encoder_fingerprint(encoder) -> list[float] | None:
    """A signature of the frozen audio encoder's weights (its first tensors), like the base's: an adapter follows
    its encoder's weights wherever they are stored (a local copy or the hub), not the folder name."""
    params = [p for p in encoder.parameters() if p.numel()][:8]
    if not params or params[0].device.type == "meta":
        return None
    flat = torch.cat([p.detach().flatten()[: 1 << 17].float().cpu() for p in params])
    probes = torch.randn(4, flat.numel(), generator=torch.Generator().manual_seed(20240918))
    return [round(float(v), 4) for v in (probes @ flat) / (flat.norm() + 1e-12)]


def encoder_settings(encoder_id: str | None) -> tuple | None:
    """What an encoder id says beside its name (kind, feature mode, rate, clip length); None when it has no name
    part (the tiny encoder's id is all settings)."""
    kind, _, rest = (encoder_id or "").partition(":")
    parts = {"clap": 3, "whisper": 2}.get(kind)
    return (kind, *rest.rsplit(":", parts)[1:]) if parts and rest.count(":") >= parts else None


class SAFEModel(nn.Module):
    def __init__(self, base, processor, audio_encoder, preset: ModelConfig, base_name: str | None = None):
        super().__init__()
        self.preset = preset
        self.base_name = base_name or preset.base_model
        self.processor = processor
        self.tokenizer = processor.tokenizer if processor is not None else None
        self.base = base
        self.audio_encoder = audio_encoder
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base.eval()
        text_cfg = base.config.text_config
        hidden = text_cfg.hidden_size
        self._input_embeddings = [base.get_input_embeddings()]  # a list: not registered as a second child module
        embed = self._input_embeddings[0].weight
        out_scale = 1.0 if embed.device.type == "meta" else float(embed.detach().float().pow(2).mean().sqrt())
        self.projector = AudioProjector(audio_encoder.feature_dim, hidden, preset.num_audio_tokens, out_scale,
                                        preset.pre_pool_steps)
        self.fusion: XAttnFusion | None = None
        if preset.fusion == "xattn":
            layers = preset.xattn_layers or default_xattn_layers(text_cfg.num_hidden_layers, preset.num_xattn_layers)
            dim = preset.xattn_dim or min(hidden, 1024)
            heads = preset.xattn_heads if dim % preset.xattn_heads == 0 else 1
            self.fusion = XAttnFusion(hidden, tuple(layers), dim, heads, preset.xattn_gate)
            self.fusion.attach(base)
        self.lora: LoraSwitch | None = None
        if preset.lora_rank > 0:
            lora_layers = attach_lora(base, preset.lora_rank, preset.lora_alpha, tuple(preset.lora_targets),
                                      preset.lora_dropout)
            self.lora = LoraSwitch(lora_layers, list(lora_parameters(base).values()))
        # Trainable parts live where the base lives; they stay fp32 (master weights) whatever the base dtype.
        device = embed.device
        if device.type != "meta":
            self.projector.to(device)
            if self.fusion is not None:
                self.fusion.to(device)
            if self.lora is not None:
                for p in self.lora.params:
                    p.data = p.data.float()
        self.builder = BatchBuilder(self.tokenizer, processor.image_processor, num_image_tokens(base.config, processor),
                                    style=get_style(preset.prompt_style, preset.system_prompt)) \
            if processor is not None else None

    # ------------------------------------------------------------------------------------ parameters

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Projector, adapters (incl. alpha) and LoRA; names are stable and used in checkpoints."""
        own = {id(p) for p in self.projector.parameters()}
        if self.fusion is not None:
            own |= {id(p) for p in self.fusion.parameters()}
        if self.lora is not None:
            own |= {id(p) for p in self.lora.params}
        return {name: p for name, p in self.named_parameters() if id(p) in own}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def frozen_parameters(self) -> dict[str, nn.Parameter]:
        trainable = {id(p) for p in self.trainable_parameters()}
        return {name: p for name, p in self.named_parameters() if id(p) not in trainable}

    def param_groups(self, lr_projector: float = 2e-4, lr_adapter: float = 1e-4,
                     weight_decay: float = 0.01) -> list[dict]:
        """AdamW groups: projector vs adapter (xattn + alpha + LoRA), each with and without weight decay.
        No decay on norms, biases, gates and position embeddings (anything 1-D, the gates, or the positions)."""
        groups: dict[tuple[str, bool], list] = {}
        for name, p in self.named_trainable_parameters().items():
            part = "projector" if name.startswith("projector.") else "adapter"
            decay = p.ndim >= 2 and "position" not in name and not is_gate(name)
            groups.setdefault((part, decay), []).append(p)
        lrs = {"projector": lr_projector, "adapter": lr_adapter}
        return [{"name": f"{part}{'' if decay else '_no_decay'}", "params": params, "lr": lrs[part],
                 "weight_decay": weight_decay if decay else 0.0}
                for (part, decay), params in sorted(groups.items())]

    def train(self, mode: bool = True) -> "SAFEModel":
        if getattr(self, "_mode", None) == mode:
            return self  # walking every base module each step costs ~3% of a tiny-model step
        self._mode = mode
        super().train(mode)
        self.base.eval()              # frozen parts never leave eval mode
        self.audio_encoder.eval()
        if self.lora is not None:
            for layer in self.lora.layers:
                for module in layer.lora_dropout.values():
                    module.train(mode)
        return self

    @property
    def device(self) -> torch.device:
        # A held reference: transformers' get_input_embeddings() is a recursive lookup, and the device is asked
        # for a dozen times a step (measured 0.5 ms a step on the tiny preset).
        return self._input_embeddings[0].weight.device

    # ----------------------------------------------------------------------------------------- audio

    def audio_features(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Frozen encoder output [B, T, D] (deterministic per clip: cacheable)."""
        return self.audio_encoder(waveforms.to(self.audio_encoder.device))

    def encode_audio(self, waveforms: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """Audio tokens [B, k, H] (gradients flow into the projector)."""
        if features is None:
            assert waveforms is not None, "encode_audio needs waveforms or features"
            features = self.audio_features(waveforms)
        return self.projector(features.to(self.device))

    def _audio_tokens(self, batch: SafeBatch, audio_tokens: torch.Tensor | None) -> torch.Tensor | None:
        if audio_tokens is not None:
            return audio_tokens
        if not batch.has_audio:
            return None
        return self.encode_audio(batch.audio, batch.audio_features)

    # --------------------------------------------------------------------------------------- forward

    def base_inputs(self, batch: SafeBatch) -> dict:
        """Exactly what the bare base model gets for ``batch`` (used for g = 0 and by equality checks)."""
        pixel_values = batch.pixel_values
        if pixel_values is not None:
            pixel_values = pixel_values.to(self.device, self.base.model.vision_tower.dtype)
        return {"input_ids": batch.input_ids.to(self.device), "attention_mask": batch.attention_mask.to(self.device),
                "position_ids": position_ids_from_mask(batch.attention_mask).to(self.device),
                "pixel_values": pixel_values}

    def _prefix_inputs(self, batch: SafeBatch, tokens: torch.Tensor, gate: float):
        """inputs_embeds with image features in place and audio tokens spliced after ``USER:``."""
        inputs = self.base_inputs(batch)
        ids = inputs["input_ids"]
        embeds = self.base.get_input_embeddings()(ids)
        if inputs["pixel_values"] is not None:
            image = self.base.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            image = torch.cat(list(image), dim=0).to(embeds.device, embeds.dtype)
            image_mask = (ids == self.base.config.image_token_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(image_mask, image)
        labels = batch.labels.to(self.device) if batch.labels is not None else None
        # In prefix mode the gate scales the spliced tokens (g = 0 never gets here: it takes the base path).
        embeds, mask, labels, _ = splice_prefix(embeds, inputs["attention_mask"], labels,
                                                batch.splice_pos.to(self.device), tokens.to(embeds.dtype) * gate)
        return embeds, mask, labels

    def forward(self, batch: SafeBatch, gate: float = 1.0, label_smoothing: float = 0.0,
                audio_tokens: torch.Tensor | None = None) -> SafeOutput:
        """Logits (and the answer-token CE loss when the batch has labels).

        gate == 0 or a batch without audio -> the bare base model, bit for bit."""
        tokens = self._audio_tokens(batch, audio_tokens) if gate != 0 else None
        labels = batch.labels.to(self.device) if batch.labels is not None else None
        # use_cache=False: one full pass, no KV cache to fill (a cache would also break the recomputation of
        # activation checkpointing, which replays each layer's forward).
        if tokens is None:
            logits = self.base(**self.base_inputs(batch), use_cache=False).logits
            return self._finish(logits, labels, label_smoothing, safe_path=False)
        with self._safe_path(tokens, gate):
            if self.preset.fusion == "prefix":
                embeds, mask, labels = self._prefix_inputs(batch, tokens, gate)
                logits = self.base(inputs_embeds=embeds, attention_mask=mask,
                                   position_ids=position_ids_from_mask(mask), use_cache=False).logits
            else:
                logits = self.base(**self.base_inputs(batch), use_cache=False).logits
        return self._finish(logits, labels, label_smoothing, safe_path=True)

    def _finish(self, logits, labels, label_smoothing, safe_path) -> SafeOutput:
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
        return SafeOutput(logits=logits, labels=labels, loss=loss, safe_path=safe_path)

    def _safe_path(self, tokens: torch.Tensor, gate: float):
        import contextlib

        stack = contextlib.ExitStack()
        if self.fusion is not None:
            stack.enter_context(self.fusion.use(tokens, gate))
        if self.lora is not None:
            stack.enter_context(self.lora.enabled(True))
        return stack

    # -------------------------------------------------------------------------------------- generate

    @torch.no_grad()
    def generate(self, batch: SafeBatch, gate: float = 1.0, max_new_tokens: int = 20, num_beams: int = 1,
                 audio_tokens: torch.Tensor | None = None, **generate_kwargs) -> list[str]:
        """Greedy (or beam) decoding; returns the decoded answers only, one per row of ``batch``."""
        if batch.labels is not None:
            raise ValueError("generate() takes a prompt-only batch (build it without answers)")
        assert self.builder is not None and self.tokenizer is not None, "generate() needs the model's processor"
        tokens = self._audio_tokens(batch, audio_tokens) if gate != 0 else None
        settings = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                        pad_token_id=self.builder.pad_id, eos_token_id=self.tokenizer.eos_token_id)
        settings.update(generate_kwargs)
        if tokens is None:
            new = self.base.generate(**self._generate_inputs(batch), **settings)[:, batch.input_ids.shape[1]:]
        elif self.preset.fusion == "prefix":
            with self._safe_path(tokens, gate):
                embeds, mask, _ = self._prefix_inputs(batch, tokens, gate)
                new = self.base.generate(inputs_embeds=embeds, attention_mask=mask, **settings)
        else:
            # Audio tokens repeated to the beam batch (generate expands rows with repeat_interleave).
            with self._safe_path(tokens.repeat_interleave(num_beams, dim=0), gate):
                new = self.base.generate(**self._generate_inputs(batch), **settings)[:, batch.input_ids.shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        return [t.strip() for t in texts]

    def _generate_inputs(self, batch: SafeBatch) -> dict:
        # generate() derives the same position ids from the mask; a None pixel_values must not be passed
        # at all (transformers would route the text-only batch through the vision tower).
        inputs = self.base_inputs(batch)
        inputs.pop("position_ids")
        return {k: v for k, v in inputs.items() if v is not None}

    # ---------------------------------------------------------------------------------------- state

    def trainable_config(self) -> dict:
        shapes = {n: list(p.shape) for n, p in self.named_trainable_parameters().items()}
        return {"format": FORMAT, "base_model": self.base_name, "base_fingerprint": base_fingerprint(self.base),
                "preset": dataclasses.asdict(self.preset), "audio_encoder": self.audio_encoder.encoder_id,
                "audio_encoder_fingerprint": encoder_fingerprint(self.audio_encoder),
                "feature_dim": self.audio_encoder.feature_dim, "fusion": self.preset.fusion,
                "num_audio_tokens": self.preset.num_audio_tokens, "pre_pool_grid": self.projector.grid,
                "xattn_layers": list(self.fusion.layer_ids) if self.fusion is not None else None,
                "xattn_gate": self.preset.xattn_gate if self.fusion is not None else None,
                "lora_rank": self.preset.lora_rank, "shapes": shapes}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.named_trainable_parameters().items()}

    def save_trainable(self, directory: str | Path) -> Path:
        """Write trainable weights (safetensors) + config (JSON) into ``directory``; frozen weights never."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.trainable_config()
        state = self.trainable_state_dict()
        atomic_write(directory / TRAINABLE_FILE, lambda path: save_file(state, str(path), metadata={"format": FORMAT}),
                     needed=sum(t.numel() * t.element_size() for t in state.values()))
        atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=1))
        return directory

    def save_pretrained(self, directory: str | Path) -> Path:
        """A shareable adapter folder (safe.models.pretrained): the trainable weights and the config naming the base
        and the audio encoder; frozen weights never."""
        return self.save_trainable(directory)

    @classmethod
    def from_pretrained(cls, source: str | Path, base: str | None = None, **kwargs) -> "SAFEModel":
        """The model of an adapter folder or hub id, on the base it names, or on ``base`` (refused unless it is the
        base the adapter was trained on). Keywords: audio_encoder, device, dtype, revision."""
        from safe.models.pretrained import from_pretrained

        return from_pretrained(source, base=base, **kwargs)

    def load_trainable(self, directory: str | Path) -> dict:
        """Load weights written by ``save_trainable``; refuses another base, encoder, fusion or shape."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / TRAINABLE_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise SafeError(f"{directory} holds no SAFE trainable state ({CONFIG_FILE} + {TRAINABLE_FILE}); "
                            "pass a folder written by save_trainable.")
        saved = json.loads(config_path.read_text())
        self._check_compatible(saved, directory)
        state = load_file(str(weights_path))
        params = self.named_trainable_parameters()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise SafeError(f"The trainable state in {directory} does not match this model (missing {missing[:3]}, "
                            f"unexpected {extra[:3]}); load it with the same --fusion/--lora-rank/--xattn-layers.")
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise SafeError(f"The trainable state in {directory} has {name} of shape {tuple(tensor.shape)}, "
                                f"this model expects {tuple(params[name].shape)}; use the same model settings.")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        return saved

    def _check_compatible(self, saved: dict, directory: Path) -> None:
        if saved.get("format") != FORMAT:
            raise SafeError(f"{directory} was written in format {saved.get('format')!r}, expected {FORMAT!r}.")
        mine = base_fingerprint(self.base)
        theirs = saved.get("base_fingerprint", {})
        same_arch = all(theirs.get(k) == mine[k] for k in mine if k != "signature")
        same_weights = theirs.get("signature") is None or mine["signature"] is None or all(
            abs(a - b) < 0.05 for a, b in zip(theirs["signature"], mine["signature"]))
        if not (same_arch and same_weights):
            raise SafeError(f"The trainable state in {directory} was trained on base model "
                            f"'{saved.get('base_model')}', not on '{self.base_name}'; load it with that base "
                            "(--base-model / --model-config).")
        if saved.get("audio_encoder") != self.audio_encoder.encoder_id and not self._same_encoder_elsewhere(saved):
            raise SafeError(f"The trainable state in {directory} was trained with audio encoder "
                            f"'{saved.get('audio_encoder')}', not '{self.audio_encoder.encoder_id}'; use the same "
                            "--audio-encoder.")
        for key in ("fusion", "num_audio_tokens", "lora_rank"):
            if saved.get(key) != self.trainable_config_value(key):
                raise SafeError(f"The trainable state in {directory} has {key}={saved.get(key)!r} but this model "
                                f"has {self.trainable_config_value(key)!r}; build the model with the same setting.")
        if "pre_pool_grid" in saved and saved["pre_pool_grid"] != self.projector.grid:
            raise SafeError(f"The trainable state in {directory} was trained on a {saved['pre_pool_grid']}-step "
                            f"pre-pool grid but this model pools to {self.projector.grid}; use the same preset.")
        mine_layers = list(self.fusion.layer_ids) if self.fusion is not None else None
        if saved.get("xattn_layers") != mine_layers:
            raise SafeError(f"The trainable state in {directory} has adapters after layers {saved.get('xattn_layers')} "
                            f"but this model after {mine_layers}; pass the same --xattn-layers.")

    def _same_encoder_elsewhere(self, saved: dict) -> bool:
        """The same encoder weights and settings under another name (a local copy of the hub model, or moved)."""
        theirs, mine = saved.get("audio_encoder_fingerprint"), encoder_fingerprint(self.audio_encoder)
        settings = encoder_settings(saved.get("audio_encoder"))
        return bool(theirs and mine and settings is not None and
                    settings == encoder_settings(self.audio_encoder.encoder_id) and
                    all(abs(a - b) < 0.05 for a, b in zip(theirs, mine)))

    def trainable_config_value(self, key: str):
        return {"fusion": self.preset.fusion, "num_audio_tokens": self.preset.num_audio_tokens,
                "lora_rank": self.preset.lora_rank}[key]
