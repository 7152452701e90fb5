"""Where the KL teacher should come from (docs/design.md, "Performance"): its own forward, the student's batch, or
a top-k cache.

KL retention needs the gate-0 base's distribution at the answer positions of each VL micro-batch. Three ways:
  separate    the teacher runs as its own no-grad forward on the B rows, then the student forward+backward
              (what the trainer does);
  same_batch  teacher and student rows share one forward of 2B rows (the teacher rows at gate 0); the backward
              then runs through all 2B rows, since autograd cannot drop rows inside a batched matmul;
  cached      the teacher's top-k logits per question are looked up (k = 32), so only the student runs;
              an upper bound on what a cache can save, reached only for questions seen before.
Each is timed on the same real VL micro-batches (toy world, tiny preset, distractor clips attached), interleaved,
medians of repeats. Within one run a question is a hit only from its second visit (`steps_before_first_hit`: after
how many optimizer steps a Stage A run on VQA v2 sees its first repeated question); the base-work cache
(safe.retention.base_work) is shared by every variant and run of a base and filled ahead by `safe cache-base`, so
every run after the first, and every run after `cache-base`, hits from its first step.

    python benchmarks/bench_teacher.py [--repeats 15] [--threads 1] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import torch
from _common import median, toy_world, trainer_config, write_result

TOP_K = 32
VQA_V2_TRAIN_QUESTIONS = 443_757


def doubled(batch):
    """The batch stacked on itself: B teacher rows + B student rows in one forward."""
    def cat(t):
        return None if t is None else torch.cat([t, t])
    return dataclasses.replace(batch, input_ids=cat(batch.input_ids), attention_mask=cat(batch.attention_mask),
                               splice_pos=cat(batch.splice_pos), labels=cat(batch.labels),
                               pixel_values=cat(batch.pixel_values), audio_features=cat(batch.audio_features),
                               ids=None if batch.ids is None else list(batch.ids) * 2)


def kl(student, teacher):
    from safe.retention import kl_distillation

    return kl_distillation(student, teacher, torch.ones(student.shape[0]), 2.0)


def separate(model, batch):
    with torch.no_grad():
        teacher = model(batch.with_audio(None), gate=0.0).answer_logits().float()
    student = model(batch, gate=1.0).answer_logits()
    kl(student, teacher).backward()


def same_batch(model, batch):
    both = model(doubled(batch), gate=1.0).answer_logits()
    half = both.shape[0] // 2
    kl(both[:half], both[half:].detach()).backward()


def cached(model, batch, top):
    values, indices = top
    student = model(batch, gate=1.0).answer_logits()
    # KL over the teacher's top-k tokens (renormalised): what a top-k cache can give.
    kl(student.gather(-1, indices), values).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from safe.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = trainer_config(toy_world(work / "world"), work, variant="soft_retention",
                                train_batch_size=args.batch_size)
        torch.manual_seed(0)
        trainer = Trainer(config)
        model = trainer.model
        model.train()
        batches, tops = [], []
        for _ in range(4):
            collated = trainer._next_batch(trainer.vl_stream)
            batch = trainer.retention.vl_batch(collated, trainer._training_distractors(collated.ids))
            batches.append(batch)
            with torch.no_grad():
                teacher = model(batch.with_audio(None), gate=0.0).answer_logits().float()
            tops.append(teacher.topk(TOP_K, dim=-1))  # what a cache would hold per question
        times = {"separate": [], "same_batch": [], "cached": []}
        for repeat in range(args.repeats + 2):
            for name in times:
                batch, top = batches[repeat % len(batches)], tops[repeat % len(batches)]
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                if name == "cached":
                    cached(model, batch, top)
                else:
                    {"separate": separate, "same_batch": same_batch}[name](model, batch)
                if repeat >= 2:  # the first two rounds warm up
                    times[name].append(time.perf_counter() - start)
        ms = {name: round(median(values) * 1000, 2) for name, values in times.items()}
    train = config.train
    vl_fraction = config.retention.vl_fraction
    vl_per_step = train.train_batch_size * max(1, round(vl_fraction / (1 - vl_fraction)))
    result = {
        "preset": "tiny", "batch_size": args.batch_size, "threads": args.threads, "top_k": TOP_K, "ms": ms,
        "ratio_same_batch_vs_separate": round(ms["same_batch"] / ms["separate"], 3),
        "ratio_cached_vs_separate": round(ms["cached"] / ms["separate"], 3),
        "vl_questions_per_step": vl_per_step,
        "note": "within one run a cache saves only from a question's second visit: with VQA v2 that is after "
                "steps_before_first_hit optimizer steps at the default settings",
        "steps_before_first_hit": VQA_V2_TRAIN_QUESTIONS // vl_per_step,
        "kept": "separate",
    }
    print(f"teacher: separate {ms['separate']} ms, same batch {ms['same_batch']} ms, cached (top-{TOP_K}) "
          f"{ms['cached']} ms")
    write_result("teacher", result, args.out)


if __name__ == "__main__":
    main()
