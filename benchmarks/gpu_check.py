"""GPU check: Stage A steps on a llava-1.5-7b-shaped model with random bf16 weights (no download).

Builds LLaVA-1.5-7B's shapes (Llama 4096 x 32 layers, vocab 32064, CLIP ViT-L/14-336; the numbers of
safe.models.factory.KNOWN_BASES) directly on the GPU in bf16, and a random Whisper-small-shaped audio encoder
from its config. The encoder runs once to give the [B, T, D] features (as the feature cache would); then, for
xattn and prefix fusion, times Stage A steps = forward + answer-token CE + backward + clip + fused AdamW on the
trainable parameters (projector + adapters, fp32 master weights; bf16 autocast like the trainer), and the bare
frozen-LLM forward+backward on the same tokens (the limit of DESIGN §10). Token ids are random: a tokenizer
plays no part in the cost.

Prints step time, tokens/s, model-FLOPs utilisation and peak memory:
  MFU = 6 * N_active * tokens / step_time / peak   (N_active: LLM parameters every token passes through,
  input embedding table excluded, + trainable parameters; peak: 989e12 bf16 dense for H100/H200 SXM).
Frozen weights get no weight gradients, so the work actually needed is ~4 * N * tokens; `mfu_4n` reports that.

    bash benchmarks/gpu_check.sh                  # on one H100/H200, <= 8 minutes
    python benchmarks/gpu_check.py --cpu-smoke    # a tiny shape on CPU: tests the code path in seconds
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common  # noqa: F401
from _common import machine

import torch

PEAK_BF16_DENSE = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

SHAPES = {
    "7b": dict(
        text=dict(vocab_size=32064, max_position_embeddings=4096, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768),
        whisper=dict(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072,
                     decoder_layers=1, decoder_attention_heads=12, decoder_ffn_dim=3072),
        num_audio_tokens=16, num_xattn_layers=3, xattn_heads=8),
    "smoke": dict(
        text=dict(vocab_size=32064, max_position_embeddings=512, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=28, patch_size=14, projection_dim=32),
        whisper=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                     decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64),
        num_audio_tokens=4, num_xattn_layers=1, xattn_heads=2),
}


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    """(LLaVA base, Whisper-shaped encoder wrapper), random weights, built in place on `device` in `dtype`."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              WhisperConfig, WhisperFeatureExtractor, WhisperModel)

    from safe.models.audio_encoders import WhisperEncoderWrapper

    config = LlavaConfig(text_config=LlamaConfig(**shape["text"]), vision_config=CLIPVisionConfig(**shape["vision"]),
                         image_token_id=32000, vision_feature_layer=-2, projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            base = LlavaForConditionalGeneration(config).eval()
            whisper = WhisperModel(WhisperConfig(**shape["whisper"])).get_encoder().eval()
    finally:
        torch.set_default_dtype(previous)  # the trainable parts are built later, in fp32
    encoder = WhisperEncoderWrapper(whisper, WhisperFeatureExtractor(), "random-whisper", clip_seconds=10.0)
    return base, encoder


def safe_model(base, encoder, shape: dict, fusion: str):
    from safe.models.presets import ModelPreset
    from safe.models.safe_model import SAFEModel

    preset = ModelPreset(name="gpu-check", base_model="random", audio_encoder="whisper", fusion=fusion,
                         num_audio_tokens=shape["num_audio_tokens"], num_xattn_layers=shape["num_xattn_layers"],
                         xattn_heads=shape["xattn_heads"], clip_seconds=10.0)
    return SAFEModel(base, None, encoder, preset, base_name="random-llava-1.5-7b-shape")


def token_batch(batch_size: int, seq_len: int, answer_len: int, vocab: int, features, device):
    """Left-padded-free caption batch: random prompt + answer ids, labels on the answer only."""
    from safe.models.batching import SafeBatch
    from safe.models.prompts import IGNORE_INDEX

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (batch_size, seq_len), generator=generator)  # below the image token id
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -answer_len:] = ids[:, -answer_len:]
    return SafeBatch(kind="audio", input_ids=ids, attention_mask=torch.ones_like(ids),
                     splice_pos=torch.full((batch_size,), 3), labels=labels, audio_features=features).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device):
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def run_fusion(base, encoder, shape, spec, batch, device, steps, warmup, peak) -> dict:
    """One Stage A configuration: ``spec`` is a fusion, optionally with ``:ckpt`` (activation checkpointing)."""
    from bench_step import bare_forward_backward
    from safe.models.checkpointing import disable_activation_checkpointing, enable_activation_checkpointing

    fusion, _, option = spec.partition(":")
    model = safe_model(base, encoder, shape, fusion)
    if option == "ckpt":
        enable_activation_checkpointing(model)
    model.train()
    params = model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device):
            loss = model(batch, gate=1.0, label_smoothing=0.1).loss.float()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss

    def limit():  # the bare base without checkpointing: a :ckpt ratio shows the recomputation's cost
        disable_activation_checkpointing(model)
        with autocast(device):
            bare_forward_backward(model, batch, 0.1)
        if option == "ckpt":
            enable_activation_checkpointing(model)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times, limit_times = [], []
    for i in range(warmup + steps):
        for fn, times in ((step, step_times), (limit, limit_times)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    step_s = sorted(step_times)[len(step_times) // 2]
    limit_s = sorted(limit_times)[len(limit_times) // 2]
    text = base.config.text_config
    llm = sum(p.numel() for p in base.model.language_model.parameters()) - text.vocab_size * text.hidden_size
    llm += sum(p.numel() for p in base.lm_head.parameters())
    trainable = sum(p.numel() for p in params)
    tokens = int(batch.attention_mask.sum()) + (batch.size * shape["num_audio_tokens"] if fusion == "prefix" else 0)
    n_active = llm + trainable
    result = {"fusion": fusion, "activation_checkpointing": option == "ckpt", "batch_size": batch.size,
              "tokens_per_step": tokens,
              "step_ms": round(step_s * 1000, 2), "limit_ms": round(limit_s * 1000, 2),
              "ratio_vs_limit": round(step_s / limit_s, 3), "tokens_per_s": round(tokens / step_s, 1),
              "n_active": n_active, "trainable_params": trainable,
              "mfu": float(f"{6 * n_active * tokens / step_s / peak:.4g}"),
              "mfu_4n": float(f"{4 * n_active * tokens / step_s / peak:.4g}"),
              "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda"
              else round(_common.peak_rss_mib() / 1024, 2)}
    if device.type == "cuda":
        torch.cuda.synchronize()
    model.fusion.detach() if model.fusion is not None else None  # the next fusion attaches to the same base
    disable_activation_checkpointing(model)
    del optimizer, model
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU (tests the code path)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None, help="prompt + caption tokens per row")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fusions", default="xattn,prefix,xattn:ckpt",
                        help="configurations to time; ':ckpt' adds activation checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the bf16 dense peak")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU; use --cpu-smoke to test the code path on CPU.")
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = SHAPES["smoke" if smoke else "7b"]
    batch_size = args.batch_size or (2 if smoke else 8)
    seq_len = args.seq_len or (24 if smoke else 256)
    steps = args.steps or (2 if smoke else 10)
    warmup = 1 if smoke else args.warmup
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else next(
        (v for k, v in PEAK_BF16_DENSE.items() if k in name), 989e12)

    started = time.perf_counter()
    base, encoder = build(shape, device, dtype)
    sync(device)
    build_s = time.perf_counter() - started
    waveforms = torch.randn(batch_size, encoder.clip_samples, generator=torch.Generator().manual_seed(1)) * 0.1
    start = time.perf_counter()
    features = encoder(waveforms)  # what the feature cache would hold
    sync(device)
    encode_s = time.perf_counter() - start
    batch = token_batch(batch_size, seq_len, min(16, seq_len // 2), shape["text"]["vocab_size"], features, device)
    print(f"built in {build_s:.1f} s on {name}; base {sum(p.numel() for p in base.parameters()) / 1e9:.2f} B params "
          f"({dtype}); audio features {tuple(features.shape)} in {encode_s:.2f} s; peak {peak / 1e12:.0f} TFLOP/s",
          flush=True)
    results = []
    for fusion in args.fusions.split(","):
        r = run_fusion(base, encoder, shape, fusion, batch, device, steps, warmup, peak)
        results.append(r)
        print(f"{fusion:>10}: step {r['step_ms']:.1f} ms (limit {r['limit_ms']:.1f} ms, ratio {r['ratio_vs_limit']:.3f}), "
              f"{r['tokens_per_s']:.0f} tokens/s, MFU {100 * r['mfu']:.1f}% (6N; 4N: {100 * r['mfu_4n']:.1f}%), "
              f"peak memory {r['peak_memory_gib']:.2f} GiB", flush=True)
    out = args.out or _common.RESULTS / ("gpu_check_cpu_smoke.json" if smoke else "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "gpu_check", "machine": machine(), "device": name, "shape": "smoke" if smoke else "llava-1.5-7b",
              "dtype": str(dtype), "peak_flops": peak, "build_seconds": round(build_s, 1),
              "encode_seconds": round(encode_s, 3), "seq_len": seq_len, "results": results}
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
