"""GPU check: Stage A's real steps on llava-1.5-7b and -13b shapes with random bf16 weights (no download).

Builds LLaVA-1.5's shapes (Llama 4096 x 32 / 5120 x 40 layers, vocab 32064, CLIP ViT-L/14-336: the numbers of
safe.models.factory.KNOWN_BASES) directly on the GPU in bf16, and the default audio encoder, CLAP (HTS-AT, the
config of laion/clap-htsat-unfused) with random weights. The encoder runs once; its 64 patches are averaged to the
projector's pre-pool grid, as the feature cache holds them. Then, for each fusion (xattn, prefix), with and without
activation checkpointing, it times the two micro-batches a soft_retention step is made of:

  caption   audio captioning: prompt + caption, about 40 tokens a row (CE on the caption, label smoothing 0.1);
  vl        a VQA retention micro-batch with a distractor clip: 576 image tokens + question + answer; the KL to the
            gate-0 teacher at the answer positions, with the teacher's forward (uncached) or its logits from the
            base-work cache (cached: only the student runs);

each as forward + backward + clip + fused AdamW on the trainable parameters (fp32 master weights, bf16 autocast, as
the trainer), interleaved with the bare frozen LLaVA's forward+backward on the same tokens (the limit: the ratio).

MFU counts the work a frozen base really needs (docs/design.md, "Performance"): per token 2N (forward) + 2N·f
(activation gradients, only above the first adapter: f = the share of N above it, 1 for prefix) + 6·N_trainable,
plus the vision tower's forward (2·N_vision per image patch) and, uncached, the teacher's forward (2N per token and
the vision tower again). N: the LLM's parameters a token passes through (the input embedding table excluded). The
dense 6N figure is reported beside it, labelled, for comparison with papers that use it. Peak: the bf16 dense peak of
the GPU from a table that tells H100 SXM / PCIe / NVL, H200 and A100 apart (--peak-tflops overrides it).

    bash benchmarks/gpu_check.sh                  # one H100/H200, under 8 minutes (a time budget skips the rest)
    python benchmarks/gpu_check.py --cpu-smoke    # tiny shapes on CPU, bf16 under autocast: tests the code path
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import _common  # noqa: F401
import torch
from _common import machine

# bf16 dense tensor-core peak, FLOP/s; first match of every word of a row in the device name wins (order matters).
PEAKS = [
    (("H100", "PCIe"), 756e12), (("H100", "NVL"), 835e12), (("H100",), 989.4e12),
    (("H200", "NVL"), 835e12), (("H200",), 989.4e12), (("GH200",), 989.4e12),
    (("A100",), 312e12), (("L40S",), 362e12), (("A10G",), 70e12),
]


def peak_flops(device_name: str) -> float | None:
    """The GPU's bf16 dense peak from PEAKS (None for an unknown GPU: pass --peak-tflops)."""
    for words, peak in PEAKS:
        if all(word.lower() in device_name.lower() for word in words):
            return peak
    return None


VISION_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768)
SHAPES = {
    "7b": dict(text=dict(vocab_size=32064, max_position_embeddings=4096, hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
               vision=VISION_336, clap={}, num_audio_tokens=16, num_xattn_layers=3, xattn_heads=8),
    "13b": dict(text=dict(vocab_size=32064, max_position_embeddings=4096, hidden_size=5120, intermediate_size=13824,
                          num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
                vision=VISION_336, clap={}, num_audio_tokens=16, num_xattn_layers=3, xattn_heads=8),
    "smoke": dict(text=dict(vocab_size=32064, max_position_embeddings=512, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2),
                  vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32),
                  clap=dict(hidden_size=128, patch_embeds_hidden_size=16, depths=[1, 1, 1, 1],
                            num_attention_heads=[1, 2, 4, 8]),
                  num_audio_tokens=4, num_xattn_layers=2, xattn_heads=2),
}
CAPTION_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS = 40, 20, 3


# ------------------------------------------------------------------------------------------------- building


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    """(LLaVA base, CLAP encoder wrapper), random weights, built in place on ``device`` in ``dtype``."""
    from transformers import (
        ClapAudioConfig,
        ClapAudioModel,
        ClapFeatureExtractor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    from safe.models.audio_encoders import ClapEncoder

    config = LlavaConfig(text_config=LlamaConfig(**shape["text"]), vision_config=CLIPVisionConfig(**shape["vision"]),
                         image_token_id=32000, vision_feature_layer=-2, projector_hidden_act="gelu")
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = LlavaForConditionalGeneration(config).eval()
            clap = ClapAudioModel(ClapAudioConfig(**shape["clap"])).eval()
    finally:
        torch.set_default_dtype(previous)  # the trainable parts are built later, in fp32
    return base, ClapEncoder(clap, ClapFeatureExtractor(), "random-clap-htsat-unfused-shape")


def safe_model(base, encoder, shape: dict, fusion: str):
    from safe.models.presets import get_preset
    from safe.models.safe_model import SAFEModel

    preset = get_preset("llava-1.5-7b", base_model="random", audio_encoder="clap", fusion=fusion,
                        num_audio_tokens=shape["num_audio_tokens"], num_xattn_layers=shape["num_xattn_layers"],
                        xattn_heads=shape["xattn_heads"])
    return SAFEModel(base, None, encoder, preset, base_name="random-llava-1.5-shape")


def batch_of(kind: str, batch_size: int, base, features, image_tokens: int, generator):
    """A caption or VQA micro-batch of random ids (a tokenizer plays no part in the cost), labels on the answer."""
    from safe.models.batching import SafeBatch
    from safe.models.prompts import IGNORE_INDEX

    answer = CAPTION_TOKENS // 2 if kind == "caption" else ANSWER_TOKENS + 1
    text = CAPTION_TOKENS if kind == "caption" else QUESTION_TOKENS + answer
    ids = torch.randint(3, 32000, (batch_size, text), generator=generator)  # below the image token id
    pixels = None
    if kind == "vl":
        image = torch.full((batch_size, image_tokens), base.config.image_token_id)
        ids = torch.cat([ids[:, :4], image, ids[:, 4:]], dim=1)
        size = base.config.vision_config.image_size
        pixels = torch.randn(batch_size, 3, size, size, generator=generator)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer:] = ids[:, -answer:]
    return SafeBatch(kind="audio" if kind == "caption" else "vl", input_ids=ids, attention_mask=torch.ones_like(ids),
                     splice_pos=torch.full((batch_size,), 3), labels=labels, pixel_values=pixels,
                     audio_features=features)


# ------------------------------------------------------------------------------------------------- FLOPs


def flop_counts(model, base, fusion: str) -> dict:
    """Parameter counts of the MFU formula: N (LLM without the input embedding table), the part of N above the
    first adapter (N·f), N_trainable, N_vision (vision tower + LLaVA's projector) and the image patches."""
    from safe.models.fusion import decoder_layers

    layers = decoder_layers(base)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    text = base.config.text_config
    llm = sum(p.numel() for p in base.model.language_model.parameters()) - text.vocab_size * text.hidden_size
    llm += sum(p.numel() for p in base.lm_head.parameters())
    first = min(model.fusion.layer_ids) if fusion == "xattn" else -1  # prefix: the gradient reaches the inputs
    above = llm - sum(per_layer[: first + 1])
    vision = sum(p.numel() for p in base.model.vision_tower.parameters()) + \
        sum(p.numel() for p in base.model.multi_modal_projector.parameters())
    return {"n": llm, "n_above_first_adapter": above, "f": above / llm,
            "n_trainable": sum(p.numel() for p in model.trainable_parameters()), "n_vision": vision}


def step_flops(counts: dict, kind: str, tokens: int, images: int, patches: int, teacher: bool) -> dict:
    """(frozen-base count, dense 6N equivalent) FLOPs of one micro-batch step."""
    n, above = counts["n"], counts["n_above_first_adapter"]
    trainable, vision = counts["n_trainable"], counts["n_vision"]
    frozen = (2 * n + 2 * above + 6 * trainable) * tokens
    dense = 6 * (n + trainable) * tokens
    if kind == "vl":
        frozen += 2 * vision * patches * images * (2 if teacher else 1)
        dense += 2 * vision * patches * images * (2 if teacher else 1)
        if teacher:
            frozen += 2 * n * tokens
            dense += 2 * n * tokens
    return {"frozen": frozen, "dense_6n": dense}


# ------------------------------------------------------------------------------------------------- timing


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device):
    """bf16 autocast on the GPU and, in the smoke run, on the CPU: the same mixed precision code path."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


class StageAStep:
    """One configuration's step and its limit, sharing one SAFE model on the base."""

    def __init__(self, base, encoder, shape, fusion: str, checkpointing: bool, device):
        from safe.models.checkpointing import enable_activation_checkpointing

        self.model = safe_model(base, encoder, shape, fusion)
        self.checkpointing, self.device = checkpointing, device
        if checkpointing:
            enable_activation_checkpointing(self.model)
        self.model.train()
        self.params = self.model.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=device.type == "cuda")

    def teacher_logits(self, batch) -> torch.Tensor:
        with torch.no_grad(), autocast(self.device):
            return self.model(batch.with_audio(None), gate=0.0).answer_logits().float()

    def step(self, batch, cached_teacher: torch.Tensor | None = None, teacher: bool = False) -> None:
        from safe.retention.kl import kl_distillation

        self.optimizer.zero_grad(set_to_none=True)
        if batch.kind == "audio":
            with autocast(self.device):
                loss = self.model(batch, gate=1.0, label_smoothing=0.1).loss.float()
        else:
            target = self.teacher_logits(batch) if teacher else cached_teacher
            with autocast(self.device):
                student = self.model(batch, gate=1.0).answer_logits()
            loss = kl_distillation(student, target, torch.ones(student.shape[0], device=student.device), 2.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()

    def limit(self, batch, teacher: bool = False) -> None:
        """The bare frozen base on the same tokens, without checkpointing (so a :ckpt ratio shows its cost)."""
        from bench_step import bare_forward_backward

        from safe.models.checkpointing import disable_activation_checkpointing, enable_activation_checkpointing

        disable_activation_checkpointing(self.model)
        with autocast(self.device):
            if teacher:
                with torch.no_grad():
                    self.model.base(**self.model.base_inputs(batch), use_cache=False)
            bare_forward_backward(self.model, batch, 0.1)
        if self.checkpointing:
            enable_activation_checkpointing(self.model)

    def close(self) -> None:
        from safe.models.checkpointing import disable_activation_checkpointing

        if self.model.fusion is not None:
            self.model.fusion.detach()  # the next configuration attaches its own adapters to the same base
        disable_activation_checkpointing(self.model)
        self.optimizer = self.model = self.params = None


def timed(device, fn, *args, **kwargs) -> float:
    sync(device)
    start = time.perf_counter()
    fn(*args, **kwargs)
    sync(device)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def run_shape(name: str, shape: dict, device, dtype, args, peak, deadline: float) -> dict:
    """Every configuration on one model shape; returns its results (and the configurations skipped for time)."""
    started = time.perf_counter()
    base, encoder = build(shape, device, dtype)
    sync(device)
    build_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)
    waveforms = torch.randn(args.batch_size, encoder.clip_samples, generator=generator) * 0.1
    start = time.perf_counter()
    raw = encoder(waveforms.to(device))  # what the feature cache is filled from
    sync(device)
    encode_s = time.perf_counter() - start
    vision = base.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    out = {"shape": name, "build_seconds": round(build_s, 1), "encode_seconds": round(encode_s, 3),
           "audio_features": list(raw.shape), "image_tokens": patches, "results": [], "skipped": []}
    print(f"[{name}] built in {build_s:.1f} s; base {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B params "
          f"({dtype}); CLAP features {tuple(raw.shape)} in {encode_s:.2f} s", flush=True)
    for spec in args.configs.split(","):
        fusion, _, option = spec.partition(":")
        if time.perf_counter() > deadline:
            out["skipped"].append(spec)
            continue
        out["results"] += run_config(base, encoder, shape, fusion, option == "ckpt", raw, patches, device, args,
                                     peak, generator, steps=args.steps if name != "13b" else max(2, args.steps // 2))
    del base, encoder
    gc.collect()  # the adapters' hooks form cycles: free the base before the next shape is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def run_config(base, encoder, shape, fusion, checkpointing, raw, patches, device, args, peak, generator, steps):
    from safe.models.projector import pre_pool

    setup = StageAStep(base, encoder, shape, fusion, checkpointing, device)
    features = pre_pool(raw, setup.model.projector.grid)
    counts = flop_counts(setup.model, base, fusion)
    results = []
    batches = {kind: batch_of(kind, args.batch_size, base, features, patches, generator).to(device)
               for kind in ("caption", "vl")}
    cached = setup.teacher_logits(batches["vl"])
    for kind, teacher in (("caption", False), ("vl", True), ("vl", False)):
        batch = batches[kind]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_s, limit_s = [], []
        for i in range(args.warmup + steps):  # interleaved: step, then its limit on the same tokens
            s = timed(device, setup.step, batch, cached, teacher)
            lim = timed(device, setup.limit, batch, teacher)
            if i >= args.warmup:
                step_s.append(s)
                limit_s.append(lim)
        step, limit = median(step_s), median(limit_s)
        tokens = int(batch.attention_mask.sum()) + (batch.size * shape["num_audio_tokens"] if fusion == "prefix"
                                                    else 0)
        flops = step_flops(counts, kind, tokens, batch.size if kind == "vl" else 0, patches, teacher)
        name = kind if kind == "caption" else f"vl_teacher_{'uncached' if teacher else 'cached'}"
        r = {"step": name, "fusion": fusion, "activation_checkpointing": checkpointing, "batch_size": batch.size,
             "tokens": tokens, "step_ms": round(step * 1000, 2), "limit_ms": round(limit * 1000, 2),
             "ratio_vs_limit": round(step / limit, 3), "tokens_per_s": round(tokens / step, 1),
             "flops_frozen_base": flops["frozen"], "flops_dense_6n": flops["dense_6n"], **counts,
             "mfu": float(f"{flops['frozen'] / step / peak:.4g}") if peak else None,
             "dense_6n_equivalent_mfu": float(f"{flops['dense_6n'] / step / peak:.4g}") if peak else None,
             "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda"
             else round(_common.peak_rss_mib() / 1024, 2)}
        results.append(r)
        mfu = f"MFU {100 * r['mfu']:.1f}% (6N dense equivalent {100 * r['dense_6n_equivalent_mfu']:.1f}%)" \
            if peak else "MFU n/a (unknown GPU peak: --peak-tflops)"
        print(f"  {fusion:>6}{' ckpt' if checkpointing else '     '} {name:<20} step {r['step_ms']:8.1f} ms  "
              f"limit {r['limit_ms']:8.1f} ms  ratio {r['ratio_vs_limit']:.3f}  {r['tokens_per_s']:9.0f} tokens/s  "
              f"{mfu}  peak {r['peak_memory_gib']:.2f} GiB", flush=True)
    setup.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU (tests the code path)")
    parser.add_argument("--shapes", default=None, help="comma-separated: 7b,13b (default both; smoke: smoke)")
    parser.add_argument("--configs", default="xattn,xattn:ckpt,prefix,prefix:ckpt",
                        help="fusions to time; ':ckpt' adds activation checkpointing")
    parser.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch (default 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=420, help="skip what would start after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's bf16 dense peak")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; use --cpu-smoke to test the code path on CPU.")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.bfloat16  # the smoke run too: a bf16 base under autocast is the path a GPU run takes
    args.batch_size = args.batch_size or (2 if smoke else 8)
    args.steps = args.steps or (1 if smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (peak_flops(name) if not smoke else 1e12)
    started = time.perf_counter()
    deadline = started + args.budget_s
    shapes = (args.shapes or ("smoke" if smoke else "7b,13b")).split(",")
    print(f"{name}: bf16 dense peak {peak / 1e12:.0f} TFLOP/s" if peak else f"{name}: unknown peak", flush=True)
    record = {"benchmark": "gpu_check", "machine": machine(), "device": name, "dtype": str(dtype), "peak_flops": peak,
              "batch_size": args.batch_size, "caption_tokens": CAPTION_TOKENS, "shapes": []}
    for shape in shapes:
        record["shapes"].append(run_shape(shape, SHAPES[shape], device, dtype, args, peak, deadline))
    record["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or _common.RESULTS / ("gpu_check_cpu_smoke.json" if smoke else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} in {record['seconds']} s")


if __name__ == "__main__":
    main()
