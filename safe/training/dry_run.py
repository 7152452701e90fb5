"""`safe train ... --dry-run`: what a run would need and take, before a GPU is spent on it.

1. The model is built on the meta device (no memory, no download; offline too, see safe.models.meta): trainable and
   frozen parameters, the bf16 weight memory, and whether each model is here or must be fetched.
2. The data are opened and checked exactly as training opens them (a bad manifest stops here, as it would stop the
   run), then, from the staged data: tokens per micro-batch and per optimizer step, the activation memory of the
   configured batch (safe.models.memory), steps per epoch, and, when benchmarks/results has a GPU measurement, an
   estimated epoch time.
Nothing is trained and no run folder is written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safe.core.quiet import note
from safe.models.memory import GIB, activation_bytes, backprop_layers, logits_bytes, step_shapes, training_state_bytes

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
WORDS_TO_TOKENS = 1.3          # Llama's tokenizer on English captions, when no tokenizer is at hand
SAMPLED_ITEMS = 2000           # texts tokenised to measure lengths
SIMULATED_BATCHES = 256        # random micro-batches drawn to find padded lengths
TEACHER_WEIGHT = 1.5           # a VL token costs the student's forward + backward and the teacher's forward


@dataclass
class Lengths:
    mean_padded: float   # tokens of a micro-batch row after padding to the batch's longest (mean over batches)
    longest: int         # the longest row of the simulated batches: what memory must hold


def padded_lengths(lengths: list[int], batch: int, seed: int = 0) -> Lengths:
    rng = np.random.default_rng(seed)
    values = np.asarray(lengths)
    draws = values[rng.integers(0, len(values), size=(SIMULATED_BATCHES, batch))].max(axis=1)
    return Lengths(float(draws.mean()), int(draws.max()))


def token_counter(preset, log=note):
    """(count(texts) -> token counts without the leading bos, how they were counted)."""
    from transformers import AutoTokenizer

    source = preset.base_model
    if source == "tiny":
        from safe.models.tiny_base import ensure_tiny_base

        source = str(ensure_tiny_base(preset.tiny_seed, log=log))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception:  # not cached: estimate from words
        return (lambda texts: [math.ceil(WORDS_TO_TOKENS * len(t.split())) for t in texts],
                f"estimated at {WORDS_TO_TOKENS} tokens a word (the base's tokenizer is not cached)")
    skip = 1 if tokenizer.bos_token_id is not None else 0

    def count(texts):
        return [len(ids) - skip for ids in tokenizer(list(texts))["input_ids"]]

    return count, "counted with the base's tokenizer"


def _sample(texts: list, seed: int = 0) -> list:
    if len(texts) <= SAMPLED_ITEMS:
        return list(texts)
    rng = np.random.default_rng(seed)
    return [texts[i] for i in rng.choice(len(texts), SAMPLED_ITEMS, replace=False)]


def gpu_measurement(fusion: str, checkpointing: bool, results_dir: Path = RESULTS_DIR) -> dict | None:
    """The gpu_check result (benchmarks/gpu_check.py) closest to this run's settings, with its device."""
    path = Path(results_dir) / "gpu_check.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("shape") != "llava-1.5-7b":
        return None  # a CPU smoke run says nothing about a GPU
    results = [r for r in record.get("results", []) if r.get("fusion") == fusion and r.get("tokens_per_s")]
    exact = [r for r in results if bool(r.get("activation_checkpointing")) == checkpointing]
    chosen = (exact or results or [None])[0]
    return {**chosen, "device": record.get("device"), "file": str(path)} if chosen else None


def active_parameters(model) -> int:
    """Parameters every token passes through (input embeddings excluded), as gpu_check counts them."""
    text = model.base.config.text_config
    llm = sum(p.numel() for p in model.base.model.language_model.parameters()) - text.vocab_size * text.hidden_size
    return llm + sum(p.numel() for p in model.base.lm_head.parameters()) + \
        sum(p.numel() for p in model.trainable_parameters())


def model_figures(config, log=note) -> dict:
    """Part 1, the model alone: parameters, weight memory, where each model comes from."""
    from safe.models.meta import base_config, build_on_meta, count_parameters
    from safe.models.staging import cached_snapshot, hub_models

    preset = config.model
    model = build_on_meta(preset, log=log)
    counts = count_parameters(preset, model)
    hub = {m.repo_id: m for m in hub_models(preset)}
    sources = []
    for role, name in (("base model", preset.base_model), ("audio encoder", preset.encoder_path or "tiny conv")):
        if name in hub:
            state = "in the Hugging Face cache" if cached_snapshot(name) else "not downloaded yet"
        elif name == "tiny" or name == "tiny conv":
            state = "built on first use, then cached"
        else:
            state = "local folder" if Path(name).expanduser().is_dir() else "MISSING local folder"
        sources.append((role, name, state))
    return {"preset": preset, "model": model, "counts": counts, "shapes": step_shapes(model), "sources": sources,
            "architecture": base_config(preset, log=log)[1], "weights_bf16": 2 * counts["frozen"],
            "training_state": training_state_bytes(counts["trainable"]), "active": active_parameters(model)}


def data_figures(config, figures: dict, data, world_size: int = 1, results_dir: Path = RESULTS_DIR,
                 log=note) -> dict:
    """Part 2, from the checked data: tokens, activation memory, steps, time."""
    from safe.models.prompts import get_style
    from safe.training.data import item_texts

    preset, shapes, train = figures["preset"], figures["shapes"], config.train
    count, how = token_counter(preset, log=log)
    style = get_style(preset.prompt_style, preset.system_prompt)
    batch, accumulation = train.train_batch_size, train.gradient_accumulation_steps
    ckpt = train.activation_checkpointing
    prompt = count([style.caption()])[0] + 1                       # + bos
    captions = count(_sample(item_texts(data.audio_train)))
    caption_rows = padded_lengths([prompt + c + 1 for c in captions], batch)  # + eos
    out = {"token_count": how, "caption_row": caption_rows,
           "caption_activations": activation_bytes(shapes, batch, caption_rows.longest, checkpointing=ckpt),
           "caption_logits": logits_bytes(shapes, batch, caption_rows.longest)}
    vl_micro = 0
    if data.vqa_train is not None:
        rows = _sample(data.vqa_train.items)
        questions = count([style.vqa(r["question"]) for r in rows])
        answers = count([str(r.get("multiple_choice_answer") or r["answers"][0]) for r in rows])
        answer_len = int(np.mean(answers)) + 1
        # A row: the prompt (+ bos, - the <image> placeholder, + the vision tower's tokens), the answer, eos.
        vl_rows = padded_lengths([q + shapes.image_tokens + a + 1 for q, a in zip(questions, answers)], batch)
        fraction = config.retention.vl_fraction
        vl_micro = max(1, round(accumulation * fraction / (1 - fraction)))
        out.update(vl_row=vl_rows,
                   vl_activations=activation_bytes(shapes, batch, vl_rows.longest, loss_positions=answer_len,
                                                   checkpointing=ckpt),
                   vl_logits=logits_bytes(shapes, batch, vl_rows.longest))
    caption_tokens = accumulation * batch * caption_rows.mean_padded
    vl_tokens = vl_micro * batch * out["vl_row"].mean_padded if vl_micro else 0.0
    steps_per_epoch = math.ceil(math.ceil(len(data.audio_train) / (batch * world_size)) / accumulation)
    total = train.max_steps or train.num_epochs * steps_per_epoch
    peak = max(out["caption_activations"] + out["caption_logits"],
               out.get("vl_activations", 0) + out.get("vl_logits", 0))
    out.update(audio_rows=len(data.audio_train), vqa_rows=len(data.vqa_train.items) if data.vqa_train else 0,
               vl_micro_batches=vl_micro, caption_tokens=caption_tokens, vl_tokens=vl_tokens,
               tokens_per_step=caption_tokens + vl_tokens, world_size=world_size,
               global_batch=batch * world_size * accumulation, steps_per_epoch=steps_per_epoch, total_steps=total,
               peak_bytes=figures["weights_bf16"] + figures["training_state"] + peak)
    measured = gpu_measurement(preset.fusion, train.activation_checkpointing, results_dir) \
        if preset.base_model != "tiny" else None
    if measured is not None:
        tokens_per_s = measured["tokens_per_s"] * measured["n_active"] / figures["active"]
        step_seconds = (caption_tokens + TEACHER_WEIGHT * vl_tokens) / tokens_per_s
        out.update(gpu=measured, tokens_per_s=tokens_per_s, step_seconds=step_seconds,
                   epoch_seconds=step_seconds * steps_per_epoch, run_seconds=step_seconds * total)
    return out


# ----------------------------------------------------------------------------------------------- printing


def _millions(n: int) -> str:
    return "0" if n == 0 else f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def model_report(config, f: dict) -> str:
    c, shapes = f["counts"], f["shapes"]
    lines = [f"Dry run: {config.train.variant} on {f['preset'].preset} (nothing is trained, no run folder is written)",
             "Models"]
    lines += [f"  {role:<14} {name}  ({state})" for role, name, state in f["sources"]]
    lines += [f"  architecture   {f['architecture']}; built on the meta device",
              "Parameters",
              f"  trainable      {_millions(c['trainable'])} (projector {_millions(c['projector'])}, xattn adapters "
              f"{_millions(c['xattn'])}, LoRA {_millions(c['lora'])})",
              f"  frozen         {_millions(c['frozen'])} (base {_millions(c['frozen_base'])}, audio encoder "
              f"{_millions(c['frozen_audio_encoder'])})",
              "Memory per GPU",
              f"  frozen weights, bf16                 {_gib(f['weights_bf16'])}",
              f"  trainable: fp32 weights, grads, AdamW {_gib(f['training_state'])} (16 bytes a parameter)",
              f"  backpropagated decoder layers        {backprop_layers(shapes)} of {shapes.layers}"]
    return "\n".join(lines)


def data_report(config, f: dict, d: dict) -> str:
    train = config.train
    cap, batch = d["caption_row"], train.train_batch_size
    lines = [f"Data ({config.data.data_root}: checked as training opens it)",
             f"  training rows       {d['audio_rows']:,} audio" + (f", {d['vqa_rows']:,} VQA" if d["vqa_rows"] else ""),
             f"  tokens              {d['token_count']}",
             f"  caption micro-batch {batch} rows x {cap.mean_padded:.0f} tokens (padded; longest {cap.longest})"]
    if "vl_row" in d:
        vl = d["vl_row"]
        lines.append(f"  VL micro-batch      {batch} rows x {vl.mean_padded:.0f} tokens ({f['shapes'].image_tokens} "
                     f"image tokens; longest {vl.longest}), {d['vl_micro_batches']} a step")
    lines += [f"  tokens per step     {d['tokens_per_step']:,.0f} per GPU (global batch {d['global_batch']} audio "
              f"rows on {d['world_size']} GPU(s))",
              f"  steps per epoch     {d['steps_per_epoch']:,}; this run: {d['total_steps']:,} optimizer steps",
              "Activation memory, bf16 (estimate: what autograd keeps for the backward"
              + (", with activation checkpointing)" if train.activation_checkpointing else ")"),
              f"  caption micro-batch {_gib(d['caption_activations'])} (+ logits {_gib(d['caption_logits'])})"]
    if "vl_row" in d:
        lines.append(f"  VL micro-batch      {_gib(d['vl_activations'])} (+ logits {_gib(d['vl_logits'])})")
    lines.append(f"  peak per GPU        ~{_gib(d['peak_bytes'])} with the weights, plus the CUDA context (~1 GiB)"
                 + ("" if train.activation_checkpointing else
                    "; --activation-checkpointing or a smaller --train-batch-size lowers it"))
    if "epoch_seconds" in d:
        gpu = d["gpu"]
        lines.append(f"Time (estimate from {gpu['tokens_per_s']:,.0f} tokens/s measured on {gpu['device']}, "
                     f"llava-1.5-7b shape, {gpu['fusion']}, {gpu['file']})")
        lines.append(f"  {d['step_seconds']:.2f} s a step; {_duration(d['epoch_seconds'])} an epoch; this run "
                     f"{_duration(d['run_seconds'])}")
    else:
        lines.append("Time: no GPU measurement in benchmarks/results (run `bash benchmarks/gpu_check.sh` on a GPU "
                     "node for an epoch-time estimate)")
    return "\n".join(lines)


def dry_run(config, results_dir: Path = RESULTS_DIR) -> int:
    from safe.training.data import load_run_data
    from safe.training.model_factory import audio_settings

    figures = model_figures(config)
    print(model_report(config, figures), flush=True)
    data = load_run_data(config, *audio_settings(config))   # a data problem is the run's error, here as there
    world = int(os.environ.get("WORLD_SIZE", "1"))
    print(data_report(config, figures, data_figures(config, figures, data, world, results_dir)))
    print("Data check passed; nothing was trained. Drop --dry-run to train.")
    return 0
