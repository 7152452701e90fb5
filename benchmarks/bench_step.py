"""Stage A training-step time vs the limit: a bare frozen-LLM forward+backward on the same token batch.

The limit (docs/design.md, "Performance"), measured on exactly the batches the step used (captured from the model's
forward):
  for each student forward of the step (gate 1, labels):  the base LLaVA forward on the same input ids,
    pixel values, attention mask and position ids (image features merged into the input embeddings, as
    LLaVA does) + the same answer-token cross-entropy (same labels, same label smoothing) + backward to
    the input embeddings (every base weight frozen, so no weight gradients);
  for each teacher forward (gate 0, no_grad, soft retention with a cold base-work cache): the same bare forward
    without backward.
The step is the whole `Trainer.train_step()` a user pays for: batch loading (features from a warm feature cache),
tokenisation, forward, backward, gradient clipping and AdamW. The step is broken down with timers wrapped around its
parts, and `model_ratio` = (forward + backward inside the step) / limit shows how much of the gap is the SAFE modules
themselves vs per-step overhead. Prefix fusion adds k audio tokens to the sequence; `ratio_vs_same_length` is against
a bare forward+backward on those L + k tokens.

Configurations: no_retention with xattn and with prefix fusion (audio micro-batch only), and soft_retention (audio
micro-batch + one VL micro-batch with distractor audio) with the base-work cache
  cold: every question new to it (the first visit of a VQA v2 question, nearly all of a Stage A run): the base's
        greedy answer (generate), the teacher forward and the student;
  warm: filled ahead (`safe cache-base`): only the student runs;
each after a warm-up that fills the feature cache. All configurations are built once and measured in interleaved
rounds (round r measures each in turn), so a noisy neighbour slows every configuration alike; each figure is the
median over rounds, with the range (min-max). `soft_over_no_retention` is the soft step / the no_retention step of
the same round; `predicted_warm_soft_over_no` = (audio + VL student limits) / audio limit, what the warm ratio tends to.
Goal: ratio <= 1.15.

    python benchmarks/bench_step.py [--rounds 3] [--steps 12] [--threads 1] [--batch-size 8] [--num-workers 0,2]
                                    [--configs no_retention:xattn,no_retention:prefix,soft_retention:xattn:cold,...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import torch
import torch.nn.functional as F
from _common import Timers, median, toy_world, trainer_config, write_result

GOAL = 1.15
DEFAULT_CONFIGS = "no_retention:xattn,no_retention:prefix,soft_retention:xattn:cold,soft_retention:xattn:warm"


# ----------------------------------------------------------------------------------------- limit


def bare_forward_backward(model, batch, label_smoothing: float, backward: bool = True,
                          extra_tokens: int = 0) -> None:
    """The bare frozen base on `batch`'s tokens: forward + CE on the same labels (+ backward to the input
    embeddings). `extra_tokens` > 0 lengthens every row by that many (zero) embeddings (prefix fusion)."""
    from safe.models.batching import position_ids_from_mask
    from safe.models.prompts import IGNORE_INDEX

    base = model.base
    inputs = model.base_inputs(batch)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = batch.labels.to(ids.device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)
        if inputs["pixel_values"] is not None:
            image = base.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
            image = torch.cat(list(image), dim=0).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter((ids == base.config.image_token_id).unsqueeze(-1), image)
    if extra_tokens:
        b = ids.shape[0]
        embeds = torch.cat([embeds.new_zeros(b, extra_tokens, embeds.shape[-1]), embeds], dim=1)
        mask = torch.cat([mask.new_ones(b, extra_tokens), mask], dim=1)
        labels = torch.cat([labels.new_full((b, extra_tokens), IGNORE_INDEX), labels], dim=1)
    with torch.set_grad_enabled(backward):
        embeds = embeds.detach().requires_grad_(backward)
        logits = base(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing)
        if backward:
            loss.backward()


def time_limit(model, calls: list[dict], extra_tokens: int = 0) -> float:
    start = time.perf_counter()
    for call in calls:
        bare_forward_backward(model, call["batch"], call["label_smoothing"], backward=call["grad"],
                              extra_tokens=extra_tokens if call["grad"] and call["batch"].kind == "audio" else 0)
    return time.perf_counter() - start


# -------------------------------------------------------------------------------------- trainer


def fill_caches(trainer, base_work: str | None) -> dict:
    """Encode every training window of every clip into the feature cache (`safe cache-features --windows all`), so
    measured steps see the steady state of a multi-epoch run; with ``base_work`` "warm", answer every training
    question with the base into the base-work cache (`safe cache-base`)."""
    from safe.training.cache_base import cache_base
    from safe.training.cache_features import cache_features

    started = time.perf_counter()
    filled = cache_features(trainer.config, trainer.model.audio_encoder, [], num_workers=0, progress=False,
                            windows=None)
    answered = 0
    if base_work == "warm":
        answered = cache_base(trainer.config, trainer.model, progress=False)["computed"]
        trainer.retention.base_work.store.refresh()
    return {"clips": filled["clips"], "windows": filled["windows"], "questions_answered": answered,
            "seconds": round(time.perf_counter() - started, 2)}


def forget_base_work(retention) -> None:
    """Make every question new again (a cold base-work cache): no answer, no teacher logits, nothing pending."""
    retention.base_answers.clear()
    cache = retention.base_work
    cache._questions.clear()
    cache.store._pending.clear()
    cache.store._pending_aliases.clear()
    cache.store._pending_bytes = 0


class Instrumented:
    """Wraps the parts of one trainer's step with timers and captures every model forward's inputs."""

    def __init__(self, trainer):
        import safe.training.trainer as trainer_module

        self.trainer, self.timers, self.calls = trainer, Timers(), []
        model = trainer.model
        original_forward = model.forward

        def forward(batch, gate=1.0, label_smoothing=0.0, **kwargs):
            grad = torch.is_grad_enabled()
            self.calls.append({"batch": batch, "gate": gate, "label_smoothing": label_smoothing, "grad": grad})
            with self.timers.section("forward_student" if grad else "forward_teacher"):
                return original_forward(batch, gate=gate, label_smoothing=label_smoothing, **kwargs)

        model.forward = forward
        model.generate = self.timers.wrap("generate", model.generate)
        trainer._next_batch = self.timers.wrap("data", trainer._next_batch)
        if trainer.retention is not None:
            trainer.retention.vl_batch = self.timers.wrap("vl_batch", trainer.retention.vl_batch)
        trainer.optimizer.step = self.timers.wrap("optimizer", trainer.optimizer.step)
        self._patches = [(trainer_module, "audio_batch", trainer_module.audio_batch),
                         (torch.nn.utils, "clip_grad_norm_", torch.nn.utils.clip_grad_norm_),
                         (torch.Tensor, "backward", torch.Tensor.backward)]

    def __enter__(self):
        for owner, name, original in self._patches:
            setattr(owner, name, self.timers.wrap({"audio_batch": "audio_batch", "clip_grad_norm_": "clip",
                                                   "backward": "backward"}[name], original))
        return self

    def __exit__(self, *exc):
        for owner, name, original in self._patches:
            setattr(owner, name, original)

    def step(self) -> tuple[float, dict, list[dict]]:
        self.calls, _ = [], self.timers.reset()
        start = time.perf_counter()
        self.trainer.train_step()
        elapsed = time.perf_counter() - start
        parts = self.timers.reset()
        # Nested sections: audio_batch/vl_batch run inside no other timer; data may run inside vl_batch.
        parts["other"] = elapsed - sum(parts.values())
        return elapsed, parts, self.calls


class Config:
    """One measured configuration: its trainer, built once, and its measurements over the rounds."""

    def __init__(self, world: Path, work: Path, spec: str, batch_size: int, num_workers: int):
        from safe.training.trainer import Trainer

        self.spec, self.num_workers = spec, num_workers
        self.variant, self.fusion, *mode = spec.split(":")
        self.base_work = mode[0] if mode else None
        config = trainer_config(world, work / spec.replace(":", "_"), variant=self.variant, fusion=self.fusion,
                                train_batch_size=batch_size, num_workers=num_workers,
                                base_work_cache_dir=str(work / spec.replace(":", "_") / "base_work"))
        torch.manual_seed(0)
        self.trainer = Trainer(config)
        self.filled = fill_caches(self.trainer, self.base_work)
        self.k = self.trainer.model.preset.num_audio_tokens if self.fusion == "prefix" else 0
        self.probe = Instrumented(self.trainer)
        self.rounds: list[dict] = []

    def measure(self, steps: int, warmup: int) -> dict:
        model = self.trainer.model
        record = {"step": [], "limit": [], "same_length": [], "limit_audio": [], "limit_vl": [], "parts": [],
                  "tokens": []}
        with self.probe:
            for i in range(warmup + steps):
                if self.base_work == "cold":
                    forget_base_work(self.trainer.retention)
                elapsed, parts, calls = self.probe.step()
                # Interleaved: the limit runs right after the step, on the very batches the step used.
                audio = [c for c in calls if c["batch"].kind == "audio"]
                vl = [c for c in calls if c["batch"].kind != "audio"]
                limit_audio, limit_vl = time_limit(model, audio), time_limit(model, vl)
                same_length = time_limit(model, calls, extra_tokens=self.k) if self.k else limit_audio + limit_vl
                model.zero_grad(set_to_none=True)
                if i < warmup:
                    continue
                for name, value in (("step", elapsed), ("limit", limit_audio + limit_vl),
                                    ("same_length", same_length), ("limit_audio", limit_audio),
                                    ("limit_vl", limit_vl), ("parts", parts),
                                    ("tokens", sum(int(c["batch"].attention_mask.sum()) for c in calls))):
                    record[name].append(value)
        figures = {name: median(record[name]) for name in ("step", "limit", "same_length", "limit_audio", "limit_vl")}
        figures["ratio"] = figures["step"] / figures["limit"]
        figures["parts"] = record["parts"]
        figures["tokens"] = int(median(record["tokens"]))
        self.rounds.append(figures)
        return figures

    def summary(self) -> dict:
        rounds = self.rounds
        ratios = [r["ratio"] for r in rounds]
        names = sorted({n for r in rounds for p in r["parts"] for n in p})
        breakdown = {n: round(median([p.get(n, 0.0) for r in rounds for p in r["parts"]]) * 1000, 2) for n in names}
        limit_ms = median([r["limit"] for r in rounds]) * 1000
        model_ms = sum(breakdown.get(n, 0.0) for n in ("forward_student", "forward_teacher", "backward"))
        out = {"config": self.spec, "variant": self.variant, "fusion": self.fusion, "base_work_cache": self.base_work,
               "num_workers": self.num_workers, "rounds": len(rounds), "tokens_per_step": rounds[0]["tokens"],
               "step_ms": round(median([r["step"] for r in rounds]) * 1000, 2), "limit_ms": round(limit_ms, 2),
               "ratio": round(median(ratios), 3), "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
               "ratio_per_round": [round(v, 3) for v in ratios], "model_ratio": round(model_ms / limit_ms, 3),
               "breakdown_ms": breakdown, "overhead_ms": round(sum(v for n, v in breakdown.items() if n not in (
                   "forward_student", "forward_teacher", "backward", "generate")), 2),
               "cache_fill": self.filled, "meets_goal": median(ratios) <= GOAL}
        if self.k:
            same = [r["step"] / r["same_length"] for r in rounds]
            out["ratio_vs_same_length"] = round(median(same), 3)
            out["ratio_vs_same_length_range"] = [round(min(same), 3), round(max(same), 3)]
        if self.variant != "no_retention":
            out["predicted_soft_over_no"] = round(median([(r["limit_audio"] + r["limit_vl"]) / r["limit_audio"]
                                                          for r in rounds]), 3)
        return out

    def close(self) -> None:
        for stream in (self.trainer.audio_stream, self.trainer.vl_stream):
            if stream is not None:
                stream.close()


def soft_over_no(configs: list[Config]) -> dict:
    """soft_retention step / no_retention xattn step of the same round and worker count: median and range."""
    out = {}
    for soft in configs:
        if soft.variant == "no_retention":
            continue
        base = next((c for c in configs if c.spec == "no_retention:xattn" and c.num_workers == soft.num_workers), None)
        if base is None:
            continue
        ratios = [s["step"] / b["step"] for s, b in zip(soft.rounds, base.rounds)]
        out[f"{soft.spec}:workers{soft.num_workers}"] = {
            "median": round(median(ratios), 3), "range": [round(min(ratios), 3), round(max(ratios), 3)],
            "predicted_warm": soft.summary().get("predicted_soft_over_no")}
    return out


def flops_saved_at_7b(batch_size: int = 8, text_tokens: int = 64, answer_tokens: int = 4) -> dict:
    """Per-step FLOPs a warm base-work cache saves at llava-1.5-7b shape (computed from the meta-device model):
    the teacher forward (LLM + vision tower) and the base's greedy answer (prefill + one decode step per answer
    token) of one VL micro-batch of ``batch_size`` questions (576 image tokens + ``text_tokens`` + the answer)."""
    from safe.models.factory import build_on_meta
    from safe.models.presets import get_preset

    model = build_on_meta(get_preset("llava-1.5-7b"))
    base = model.base
    text = base.config.text_config
    n = sum(p.numel() for p in base.model.language_model.parameters()) - text.vocab_size * text.hidden_size
    n += sum(p.numel() for p in base.lm_head.parameters())
    vision = sum(p.numel() for p in base.model.vision_tower.parameters()) + \
        sum(p.numel() for p in base.model.multi_modal_projector.parameters())
    patches = 577  # CLIP ViT-L/14 at 336 px: 24 x 24 patches + CLS, all through the tower
    prompt = 576 + text_tokens
    vl_tokens = batch_size * (prompt + answer_tokens)
    vision_flops = 2 * vision * patches * batch_size
    teacher = 2 * n * vl_tokens + vision_flops
    generate = 2 * n * batch_size * prompt + vision_flops + 2 * n * batch_size * answer_tokens
    trainable = sum(p.numel() for p in model.trainable_parameters())
    first = min(model.fusion.layer_ids)
    per_layer = sum(p.numel() for p in base.model.language_model.layers[0].parameters())
    above = n - per_layer * (first + 1)
    caption_tokens = batch_size * 40
    student = (2 * n + 2 * above + 6 * trainable) * (vl_tokens + caption_tokens) + vision_flops
    total_cold = student + teacher + generate
    return {"shape": "llava-1.5-7b (xattn, CLAP)", "batch_size": batch_size, "vl_tokens": vl_tokens,
            "caption_tokens": caption_tokens, "n_llm": n, "n_vision": vision, "n_trainable": trainable,
            "teacher_tflop": round(teacher / 1e12, 1), "generate_tflop": round(generate / 1e12, 1),
            "saved_tflop_per_step": round((teacher + generate) / 1e12, 1),
            "step_tflop_cold": round(total_cold / 1e12, 1), "step_tflop_warm": round(student / 1e12, 1),
            "saved_fraction": round((teacher + generate) / total_cold, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats (>= 3 for a range)")
    parser.add_argument("--steps", type=int, default=12, help="measured steps per configuration and round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadier numbers on a shared machine)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated variant:fusion[:cold|warm] (the base-work cache of soft_retention)")
    parser.add_argument("--num-workers", default="0,2",
                        help="comma-separated loader worker counts to measure (0: loading is serial, its whole cost "
                             "shows in the step; 2: the default of `safe train`)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results, relative = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = toy_world(work / "world")
        for workers in [int(n) for n in str(args.num_workers).split(",")]:
            configs = [Config(world, work / f"workers{workers}", spec, args.batch_size, workers)
                       for spec in args.configs.split(",")]
            for round_index in range(args.rounds):
                for config in configs:
                    r = config.measure(args.steps, args.warmup if round_index == 0 else 1)
                    print(f"round {round_index + 1} workers {workers} {config.spec:>28}: "
                          f"step {r['step'] * 1000:6.1f} ms  limit {r['limit'] * 1000:6.1f} ms  "
                          f"ratio {r['ratio']:.3f}", flush=True)
            for config in configs:
                results.append(config.summary())
                config.close()
            relative.update(soft_over_no(configs))
    for r in results:
        print(f"{r['config']:>28} workers {r['num_workers']}: ratio {r['ratio']:.3f} "
              f"[{r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f}] (model-only {r['model_ratio']:.3f}, "
              f"overhead {r['overhead_ms']} ms) {r['breakdown_ms']}")
    for name, figures in relative.items():
        print(f"{name} / no_retention:xattn step: {figures['median']} [{figures['range'][0]}-{figures['range'][1]}]"
              f" (predicted warm: {figures['predicted_warm']})")
    saved = flops_saved_at_7b(args.batch_size)
    print(f"7B shape: a warm base-work cache saves {saved['saved_tflop_per_step']} TFLOP of "
          f"{saved['step_tflop_cold']} a soft_retention step ({100 * saved['saved_fraction']:.0f}%)")
    summary = {"preset": "tiny", "device": "cpu" if not torch.cuda.is_available() else "cuda", "goal_ratio": GOAL,
               "threads": args.threads, "batch_size": args.batch_size, "rounds": args.rounds, "steps": args.steps,
               "ratios": {f"{r['config']}:workers{r['num_workers']}": {"median": r["ratio"], "range": r["ratio_range"]}
                          for r in results},
               "soft_over_no_retention": relative, "flops_saved_at_7b": saved}
    write_result("step", {**summary, "results": results}, args.out)


if __name__ == "__main__":
    main()
