"""Stage A training-step time vs the limit: a bare frozen-LLM forward+backward on the same token batch.

The limit (DESIGN §10), measured on exactly the batches the step used (captured from the model's forward):
  for each student forward of the step (gate 1, labels):  the base LLaVA forward on the same input ids,
    pixel values, attention mask and position ids (image features merged into the input embeddings, as
    LLaVA does) + the same answer-token cross-entropy (same labels, same label smoothing) + backward to
    the input embeddings (every base weight frozen, so no weight gradients);
  for each teacher forward (gate 0, no_grad, soft retention only): the same bare forward without backward.
The step is the whole `Trainer.train_step()` a user pays for: batch loading (features from a warm feature
cache), tokenisation, forward, backward, gradient clipping and AdamW. The step is broken down with timers
wrapped around its parts, and `model_ratio` = (forward + backward inside the step) / limit shows how much
of the gap is the SAFE modules themselves vs per-step overhead. Prefix fusion adds k audio tokens to the
sequence; `ratio_vs_same_length` is against a bare forward+backward on those L + k tokens.

Variants: no_retention with xattn and with prefix fusion (audio micro-batch only), and soft_retention
(audio micro-batch + one VL micro-batch: teacher forward + student forward/backward with distractor audio),
each after a warm-up that fills the feature cache and the base-answer (KL target) table.
Goal: ratio <= 1.15.

    python benchmarks/bench_step.py [--steps 12] [--threads 1] [--batch-size 8] [--num-workers 0,2]
                                    [--variants no_retention:xattn,...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
from _common import Timers, median, toy_world, trainer_config, write_result

import torch
import torch.nn.functional as F

GOAL = 1.15
DEFAULT_VARIANTS = "no_retention:xattn,no_retention:prefix,soft_retention:xattn"


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


def fill_caches(trainer) -> dict:
    """Encode every training window of every clip into the feature cache (`safe cache-features`), and answer every
    training question with the base (the KL targets), so measured steps see the steady state of a multi-epoch run."""
    from safe.training.cache_features import cache_features

    started = time.perf_counter()
    filled = cache_features(trainer.config, trainer.model.audio_encoder, [], num_workers=0, progress=False)
    answered = 0
    if trainer.retention is not None:
        stream = trainer.vl_stream
        for _ in range(stream.batches_per_epoch):
            collated = trainer._next_batch(stream)
            trainer.retention._base_answers(collated)
            answered += collated["size"]
        stream.load_state({"epoch": 0, "consumed": 0})
    return {"clips": filled["clips"], "windows": filled["windows"], "questions_answered": answered,
            "seconds": round(time.perf_counter() - started, 2)}


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


def run_variant(world: Path, work: Path, variant: str, fusion: str, steps: int, warmup: int, batch_size: int,
                num_workers: int = 0) -> dict:
    from safe.training.trainer import Trainer

    config = trainer_config(world, work, variant=variant, fusion=fusion, train_batch_size=batch_size,
                            num_workers=num_workers)
    torch.manual_seed(0)
    trainer = Trainer(config)
    model = trainer.model
    filled = fill_caches(trainer)
    steps_s, limits_s, same_length_s, parts_all, tokens = [], [], [], [], []
    k = model.preset.num_audio_tokens if fusion == "prefix" else 0
    with Instrumented(trainer) as probe:
        for i in range(warmup + steps):
            elapsed, parts, calls = probe.step()
            # Interleaved: the limit runs right after the step, on the very batches the step used.
            limit = time_limit(model, calls)
            same_length = time_limit(model, calls, extra_tokens=k) if k else limit
            model.zero_grad(set_to_none=True)
            if i < warmup:
                continue
            steps_s.append(elapsed)
            limits_s.append(limit)
            same_length_s.append(same_length)
            parts_all.append(parts)
            tokens.append(sum(int(c["batch"].attention_mask.sum()) for c in calls))
    step, limit, same_length = median(steps_s), median(limits_s), median(same_length_s)
    names = sorted({n for p in parts_all for n in p})
    breakdown = {n: round(median([p.get(n, 0.0) for p in parts_all]) * 1000, 2) for n in names}
    model_ms = sum(breakdown.get(n, 0.0) for n in ("forward_student", "forward_teacher", "backward"))
    result = {
        "variant": variant, "fusion": fusion, "num_workers": num_workers,
        "batch_size": batch_size, "steps_measured": steps,
        "tokens_per_step": int(median(tokens)),
        "step_ms": round(step * 1000, 2), "limit_ms": round(limit * 1000, 2),
        "ratio": round(step / limit, 3),
        "model_ratio": round(model_ms / (limit * 1000), 3),
        "breakdown_ms": breakdown,
        "cache_fill": filled,
        "meets_goal": step / limit <= GOAL,
    }
    if k:
        result["limit_same_length_ms"] = round(same_length * 1000, 2)
        result["ratio_vs_same_length"] = round(step / same_length, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: steadier numbers on a shared machine)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated variant:fusion pairs")
    parser.add_argument("--num-workers", default="0,2",
                        help="comma-separated loader worker counts to measure (0: loading is serial, its whole cost "
                             "shows in the step; 2: the default of `safe train`)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        world = toy_world(work / "world")
        for workers in [int(n) for n in str(args.num_workers).split(",")]:
            for spec in args.variants.split(","):
                variant, fusion = spec.split(":")
                r = run_variant(world, work, variant, fusion, args.steps, args.warmup, args.batch_size, workers)
                results.append(r)
                print(f"{variant:>15} {fusion:>6} workers {workers}: step {r['step_ms']:.1f} ms  "
                      f"limit {r['limit_ms']:.1f} ms  ratio {r['ratio']:.3f}  (model-only {r['model_ratio']:.3f})  "
                      f"{r['breakdown_ms']}", flush=True)
    summary = {"preset": "tiny", "device": "cpu" if not torch.cuda.is_available() else "cuda",
               "goal_ratio": GOAL, "threads": args.threads, "batch_size": args.batch_size,
               "ratios": {f"{r['variant']}:{r['fusion']}:workers{r['num_workers']}": r["ratio"] for r in results}}
    write_result("step", {**summary, "results": results}, args.out)


if __name__ == "__main__":
    main()
