"""Stage A training loop (DESIGN §5, §7).

One optimizer step = `gradient_accumulation_steps` audio caption micro-batches, then (variants with retention)
VL micro-batches carrying distractor audio, trained to keep the base's own answers (KL to the gate-0 teacher).
Audio gradients are projected off the protected VL directions first when null-space retention is on; the
Fisher penalty is added last. Every run writes config.json at start, metrics.json after each evaluation,
train_log.jsonl, checkpoints (atomic, resumable) and plots.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from safe.config import RunConfig
from safe.errors import SafeError
from safe.eval.evaluator import BasePredictionCache, Evaluator
from safe.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from safe.training.data import BatchStream, item_texts, load_run_data
from safe.models.prompts import caption_prompt
from safe.training.features import attach_feature_cache, audio_batch
from safe.training.distributed import (DistInfo, all_true, any_true, average_gradients, average_tensors, barrier,
                                       broadcast_object, init_distributed)
from safe.training.model_factory import audio_settings, build_model
from safe.training.outputs import RunLogger, environment, new_run_dir, write_json_atomic
from safe.training.plots import write_plots
from safe.training.tracking import make_sinks
from safe.training.retention import FisherPenalty, NullSpaceProjector, kl_distillation
from safe.training.schedule import warmup_cosine

AUDIO_STREAM, VL_STREAM = 0, 1


class StopRequested:
    """SIGTERM/SIGUSR1 set a flag; the loop checkpoints at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resolve_run_dir(config: RunConfig) -> tuple[Path, bool]:
    """A new run folder, or the folder to resume (`--resume auto`: the newest unfinished one of this variant)."""
    resume = config.train.resume
    if resume is None:
        return new_run_dir(config.train.output_root, config.train.variant, config.train.run_name), False
    if resume != "auto":
        path = Path(resume)
        if latest_checkpoint(path) is None:
            raise SafeError(f"Cannot resume {path}: it holds no checkpoint; start a new run without --resume.")
        return path, True
    root = Path(config.train.output_root)
    candidates = sorted(
        (p for p in root.glob(f"*_{config.train.variant}*") if p.is_dir() and latest_checkpoint(p) is not None),
        key=lambda p: p.name,
    )
    unfinished = [p for p in candidates if _state(p) != "completed"]
    if unfinished:
        return unfinished[-1], True
    return new_run_dir(root, config.train.variant, config.train.run_name), False


def _state(run_dir: Path) -> str | None:
    path = run_dir / "run_state.json"
    return json.loads(path.read_text()).get("state") if path.exists() else None


class Trainer:
    def __init__(self, config: RunConfig, dist_info: DistInfo | None = None, device: torch.device | None = None):
        self.config = config
        if dist_info is None:
            dist_info, device = init_distributed()
        self.dist, self.device = dist_info, device
        self.is_main = self.dist.is_main
        train = config.train
        sample_rate, clip_seconds = audio_settings(config)
        self.data = load_run_data(config, sample_rate, clip_seconds)  # fail fast, before the model
        # Rank 0 alone picks (and creates) the run folder; the others follow it.
        located = resolve_run_dir(config) if self.is_main else None
        run_dir, self.resuming = broadcast_object(located and (str(located[0]), located[1]), self.dist)
        self.run_dir = Path(run_dir)
        if self.resuming:
            saved = json.loads((self.run_dir / "config.json").read_text())["config"]
            saved["train"]["resume"] = train.resume
            self.config = config = RunConfig.from_dict(saved).validate()
            train = config.train
        elif self.is_main:
            write_json_atomic(self.run_dir / "config.json", {
                "config": config.to_dict(), "environment": environment(),
                "distributed": {"world_size": self.dist.world_size,
                                "global_batch_size": self.global_batch_size(config)}})
        self._set_state("running")
        torch.manual_seed(train.seed)
        np.random.seed(train.seed % 2**32)
        if not self.is_main:
            barrier(self.dist)  # rank 0 builds/caches shared artefacts (e.g. the tiny base) first
        self.model = build_model(config, self.device)
        if train.activation_checkpointing:
            from safe.models.checkpointing import enable_activation_checkpointing

            enable_activation_checkpointing(self.model)
        if self.is_main:
            barrier(self.dist)
        encoder = self.model.audio_encoder
        if (encoder.sample_rate, encoder.clip_seconds) != (sample_rate, clip_seconds):
            raise RuntimeError(f"audio encoder expects {encoder.sample_rate} Hz / {encoder.clip_seconds} s but the "
                               f"data were set up for {sample_rate} Hz / {clip_seconds} s")
        self.feature_cache = attach_feature_cache(config, encoder, self._audio_datasets())
        if self.data.vqa_train is not None:  # images preprocessed in the loader workers, not in the step
            self.data.vqa_train.image_processor = self.model.builder.image_processor
        # Every training caption tokenised once, in batched calls, instead of a few at a time in each step.
        captions = item_texts(self.data.audio_train)
        self.model.builder.warm([caption_prompt()] * len(captions), captions)
        self.params = self.model.named_trainable_parameters()
        # fused: one kernel over all tensors instead of a Python loop per tensor (1.3 -> 0.55 ms a step, CPU)
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(train.lr_projector, train.lr_adapter, train.weight_decay), fused=True)
        shard = dict(rank=self.dist.rank, world_size=self.dist.world_size, length_grouping=train.length_grouping)
        self.audio_stream = BatchStream(self.data.audio_train, train.train_batch_size, train.seed, AUDIO_STREAM,
                                        config.data.num_workers, mix=self.data.source_mix, **shard)
        self.vl_stream = BatchStream(self.data.vqa_train, train.train_batch_size, train.seed, VL_STREAM,
                                     config.data.num_workers, **shard) if self.data.vqa_train is not None else None
        self.total_steps = train.max_steps or train.num_epochs * math.ceil(
            self.audio_stream.batches_per_epoch / train.gradient_accumulation_steps)
        warmup = train.warmup_steps if train.warmup_steps is not None else max(1, self.total_steps // 20)
        self.scheduler = warmup_cosine(self.optimizer, warmup, self.total_steps)
        retention = config.retention
        self.fisher = FisherPenalty(self.params) if retention.fisher_weight > 0 else None
        self.null_space = NullSpaceProjector(retention.null_space_rank) if retention.null_space_rank > 0 else None
        self.base_answers: dict[str, str] = {}  # gate-0 greedy answers to training questions (the KL targets)
        self.step = 0
        self.history: list[dict] = []
        self.counters = {"nonfinite_skipped_steps": 0, "consecutive_nonfinite": 0, "skipped_samples": 0,
                         "audio_samples": 0, "vl_samples": 0, "train_seconds": 0.0}
        sinks = make_sinks(self.run_dir, train.tensorboard, train.wandb_project, config.to_dict()) \
            if self.is_main else []
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, sinks=sinks)
        self.evaluator = Evaluator(self.model, self.data.audio_val, self.data.vqa_val, self.data.distractor_pool,
                                   config, self.run_dir, self.device,
                                   BasePredictionCache(self.model, {"max_new_tokens": train.generation_max_new_tokens,
                                                                    "num_beams": train.num_beams}), self.dist)
        self.logger.log({"event": "start", "world_size": self.dist.world_size,
                         "global_batch_size": self.global_batch_size(config), "total_steps": self.total_steps})
        self.evaluator.feature_cache = self.feature_cache
        if self.resuming:
            self._restore()

    def _audio_datasets(self):
        train = self.data.audio_train
        return [*getattr(train, "datasets", [train]), self.data.audio_val, self.data.distractor_pool]

    # ------------------------------------------------------------------------------------- state

    def global_batch_size(self, config: RunConfig) -> int:
        """Audio samples per optimizer step: per-rank batch × world size × accumulation."""
        train = config.train
        return train.train_batch_size * self.dist.world_size * train.gradient_accumulation_steps

    def _set_state(self, state: str, **extra) -> None:
        if self.is_main:
            write_json_atomic(self.run_dir / "run_state.json", {"state": state, **extra})

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "audio_stream": self.audio_stream.state(),
            "vl_stream": self.vl_stream.state() if self.vl_stream else None,
            "fisher": self.fisher.state_dict() if self.fisher else None,
            "null_space": self.null_space.state_dict() if self.null_space else None,
            "base_answers": json.dumps(self.base_answers),
            "counters": json.dumps(self.counters),
        }

    def save(self) -> None:
        """Rank 0 writes (all ranks hold the same trainable state); the others wait for it."""
        if self.is_main:
            meta = {"variant": self.config.train.variant, "total_steps": self.total_steps,
                    "world_size": self.dist.world_size}
            save_checkpoint(self.run_dir, self.step, self.model, self._trainer_state(), meta)
        barrier(self.dist)

    def _restore(self) -> None:
        path = latest_checkpoint(self.run_dir)
        state = load_checkpoint(path, self.model)
        self.step = state["step"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.audio_stream.load_state(state["audio_stream"])
        if self.vl_stream and state["vl_stream"]:
            self.vl_stream.load_state(state["vl_stream"])
        if self.fisher and state["fisher"]:
            self.fisher.load_state_dict(state["fisher"])
        if self.null_space and state["null_space"]:
            self.null_space.load_state_dict(state["null_space"])
        self.base_answers = json.loads(state["base_answers"])
        self.counters = json.loads(state["counters"])
        set_rng_state(state["rng"])
        metrics_path = self.run_dir / "metrics.json"
        if metrics_path.exists():
            self.history = json.loads(metrics_path.read_text()).get("history", [])
        self.logger.log({"event": "resumed", "step": self.step, "checkpoint": path.name})

    # ------------------------------------------------------------------------------------ batches

    def _autocast(self):
        if self.device.type == "cuda" and self.config.train.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_batch(self, stream: BatchStream) -> dict:
        """The next batch with at least one loadable sample; bad samples are counted, never replaced."""
        for _ in range(1000):
            collated = stream.next()
            self.counters["skipped_samples"] += len(collated["skipped"])
            for bad in collated["skipped"]:
                self.logger.log({"event": "skipped_sample", "step": self.step, **bad})
            if collated["size"]:
                return collated
        raise SafeError("No training sample could be loaded in 1000 batches; run `safe data validate`.")

    def _distractors(self, collated: dict, micro: int) -> torch.Tensor | None:
        """Distractor clips for a VL micro-batch, drawn from (seed, step, micro) for reproducibility."""
        rng = np.random.default_rng([self.config.train.seed, self.step, micro, 7])
        if rng.random() >= self.config.retention.distractor_prob:
            return None
        return self.evaluator.distractor_audio([f"{self.step}:{micro}:{i}" for i in collated["ids"]])


    def _base_answers(self, collated: dict) -> list[str]:
        """The base model's own greedy answers (gate 0): what KL retention keeps. Computed once per question."""
        ids = [str(i) for i in collated["ids"]]
        missing = [i for i, key in enumerate(ids) if key not in self.base_answers]
        if missing:
            pixels = collated["pixel_values"]
            batch = self.model.builder.vqa_batch(
                None if pixels is not None else [collated["images"][i] for i in missing],
                [collated["questions"][i] for i in missing],
                pixel_values=pixels[missing] if pixels is not None else None).to(self.device)
            answers = self.model.generate(batch, gate=0.0, max_new_tokens=self.config.train.generation_max_new_tokens)
            for i, answer in zip(missing, answers):
                self.base_answers[ids[i]] = answer
        return [self.base_answers[key] for key in ids]

    def _vl_batch(self, collated: dict, features: torch.Tensor | None):
        """A VQA batch labelled with the base's own answers, with `features` (distractor clips) attached."""
        answers = self._base_answers(collated)
        batch = self.model.builder.vqa_batch(collated["images"], collated["questions"], answers,
                                             pixel_values=collated["pixel_values"])
        return batch.with_audio(audio_features=features).to(self.device)

    def _vl_kl(self, batch) -> torch.Tensor:
        """T²·KL(p_base ‖ p_safe) on the answer positions; the teacher is the gate-0 model in fp32."""
        with torch.no_grad():
            teacher = self.model(batch.with_audio(None), gate=0.0).answer_logits().float()
        with self._autocast():
            student = self.model(batch, gate=1.0).answer_logits()
        mask = torch.ones(student.shape[0], device=student.device)
        return kl_distillation(student, teacher, mask, self.config.retention.kl_temperature)

    def _vl_nll(self, batch) -> torch.Tensor:
        with self._autocast():
            return self.model(batch, gate=1.0).loss.float()

    # ---------------------------------------------------------------------------------- retention

    def _vl_samples(self, count: int, salt: int):
        """`count` VL micro-batches for Fisher / null-space estimation, with distractor audio attached."""
        batches = []
        for i in range(count):
            collated = self._next_batch(self.vl_stream)
            features = self.evaluator.distractor_audio([f"{salt}:{self.step}:{i}:{q}" for q in collated["ids"]])
            batches.append(self._vl_batch(collated, features))
        return batches

    def _refresh_retention(self) -> None:
        retention = self.config.retention
        if self.fisher is not None and self.step % retention.fisher_refresh == 0:
            def per_sample():
                for batch in self._vl_samples(retention.fisher_batches, salt=11):
                    for row in range(batch.size):
                        single = _select(batch, row)
                        yield lambda single=single: self._vl_nll(single)
            used = self.fisher.estimate(per_sample())
            if self.fisher.fisher is not None:
                self.fisher.fisher = average_tensors(self.fisher.fisher, self.dist)
            self.logger.log({"event": "fisher_refresh", "step": self.step, "samples": used})
        if self.null_space is not None and self.step % retention.null_space_refresh == 0:
            self.null_space.reset()
            tensors = list(self.params.values())
            for batch in self._vl_samples(retention.null_space_batches, salt=13):
                grads = torch.autograd.grad(self._vl_nll(batch), tensors, materialize_grads=True)
                # Averaged over ranks so that every rank protects the same basis.
                self.null_space.add(average_tensors(dict(zip(self.params, grads)), self.dist))
            self.logger.log({"event": "null_space_refresh", "step": self.step,
                             "tensors": len(self.null_space.bases)})

    # --------------------------------------------------------------------------------------- step

    def train_step(self) -> dict:
        config = self.config
        accumulation = config.train.gradient_accumulation_steps
        self.model.train()
        if config.retention.use_vl:
            self._refresh_retention()
        self.optimizer.zero_grad(set_to_none=True)
        # Losses stay tensors until the step ends: one host sync a step instead of one per micro-batch.
        zero = torch.zeros((), device=self.device)
        losses = {"caption_loss": zero, "kl_loss": zero, "fisher_penalty": zero}
        for micro in range(accumulation):
            collated = self._next_batch(self.audio_stream)
            batch = audio_batch(self.model, collated, self.feature_cache).to(self.device)
            with self._autocast():
                loss = self.model(batch, gate=1.0, label_smoothing=config.train.label_smoothing).loss.float()
            (loss / accumulation).backward()
            losses["caption_loss"] = losses["caption_loss"] + loss.detach() / accumulation
            self.counters["audio_samples"] += batch.size
        if self.null_space is not None:
            self.null_space.project_({n: p.grad for n, p in self.params.items() if p.grad is not None})
        if config.retention.use_vl and config.retention.kl_weight > 0:
            vl_micro = max(1, round(accumulation * config.retention.vl_fraction / (1 - config.retention.vl_fraction)))
            for micro in range(vl_micro):
                collated = self._next_batch(self.vl_stream)
                batch = self._vl_batch(collated, self._distractors(collated, micro))
                self.counters["vl_samples"] += batch.size
                if not batch.has_audio:  # no distractor drawn: the SAFE path is the base, nothing to retain
                    continue
                kl = self._vl_kl(batch)
                (config.retention.kl_weight * kl / vl_micro).backward()
                losses["kl_loss"] = losses["kl_loss"] + kl.detach() / vl_micro
        if self.fisher is not None and self.fisher.fisher is not None:
            penalty = self.fisher.penalty()
            (config.retention.fisher_weight * penalty).backward()
            losses["fisher_penalty"] = penalty.detach()
        average_gradients(list(self.params.values()), self.dist)  # once per optimizer step (DDP's no_sync)
        # One non-finite check for the whole step: a NaN/inf in any loss or gradient makes the total gradient
        # norm (computed anyway for clipping) non-finite. Clipping scales gradients in place, so a bad step's
        # gradients are dropped below before the optimizer could see them.
        grads = [p for p in self.params.values() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(grads, config.train.grad_clip) if grads else zero
        figures = torch.stack([grad_norm.float().to(self.device), *losses.values()]).tolist()  # one sync for all
        grad_norm, losses = figures[0], dict(zip(losses, figures[1:]))
        finite = all(math.isfinite(v) for v in figures)
        if not all_true(finite, self.dist):
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["nonfinite_skipped_steps"] += 1
            self.counters["consecutive_nonfinite"] += 1
            if self.counters["consecutive_nonfinite"] >= config.train.max_consecutive_nonfinite:
                raise SafeError(
                    f"{self.counters['consecutive_nonfinite']} optimizer steps in a row had a non-finite loss or "
                    "gradient; lower the learning rates (--lr-projector/--lr-adapter) or check the data.")
            grad_norm = float("nan")
        else:
            self.counters["consecutive_nonfinite"] = 0
            self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        alphas = [p.detach().reshape(-1) for n, p in self.params.items() if n.endswith("alpha")]
        max_alpha = float(torch.tanh(torch.cat(alphas)).abs().max()) if alphas else None
        return {**losses, "grad_norm": grad_norm, "finite": finite,
                "lr_projector": self.optimizer.param_groups[0]["lr"], "max_abs_tanh_alpha": max_alpha}

    # ---------------------------------------------------------------------------------------- run

    def evaluate(self) -> dict:
        metrics = self.evaluator.run(self.step)
        self.history.append(metrics)
        self.logger.log({"event": "eval", **metrics})
        # Flat keys (wavcaps_realised, ...) so the trackers plot the realised mix as well.
        self.logger.log({"event": "source_mix", "step": self.step, **{
            f"{name}_{key}": value for name, figures in self.audio_stream.source_mix().items()
            for key, value in figures.items()}})
        self.write_metrics()
        return metrics

    def write_metrics(self, status: str = "running") -> None:
        if not self.is_main:
            return
        train = self.config.train
        seconds = max(self.counters["train_seconds"], 1e-9)
        # Counters are rank 0's; every rank sees the same number of samples per step.
        samples = (self.counters["audio_samples"] + self.counters["vl_samples"]) * self.dist.world_size
        write_json_atomic(self.run_dir / "metrics.json", {
            "validation": self.history[-1] if self.history else {},
            "history": self.history,
            "training": {"variant": train.variant, "step": self.step, "total_steps": self.total_steps,
                         "status": status, **{k: v for k, v in self.counters.items() if k != "consecutive_nonfinite"},
                         "world_size": self.dist.world_size, "global_batch_size": self.global_batch_size(self.config),
                         "source_mix": self.audio_stream.source_mix()},
            "throughput": {"samples_per_second": samples / seconds, "steps_per_second": self.step / seconds,
                           "seconds_per_step": seconds / max(self.step, 1)},
        })

    def fit(self) -> dict:
        train = self.config.train
        eval_every = train.eval_every
        save_every = train.save_every
        bar = tqdm(total=self.total_steps, initial=self.step, desc=train.variant,
                   disable=not (train.progress and self.is_main), dynamic_ncols=True)
        status = "completed"
        with StopRequested() as stop:
            while self.step < self.total_steps:
                started = time.perf_counter()
                record = self.train_step()
                elapsed = time.perf_counter() - started
                self.counters["train_seconds"] += elapsed
                if self.step % train.log_every == 0 or self.step == 1:
                    self.logger.log({"event": "train", "step": self.step, **record, "step_seconds": round(elapsed, 4)})
                bar.update(1)
                bar.set_postfix(loss=f"{record['caption_loss']:.3f}", kl=f"{record['kl_loss']:.3f}",
                                lr=f"{record['lr_projector']:.1e}",
                                sps=f"{train.train_batch_size * train.gradient_accumulation_steps / elapsed:.1f}")
                last = self.step >= self.total_steps
                evaluated = False
                if eval_every and self.step % eval_every == 0 and not last:
                    self.evaluate()
                    evaluated = True
                if (save_every and self.step % save_every == 0) or evaluated:
                    self.save()
                if any_true(stop.signal is not None, self.dist) and not last:
                    self.save()
                    status = "interrupted"
                    self.logger.log({"event": "interrupted", "signal": stop.signal, "step": self.step})
                    bar.write(f"stopped by a signal at step {self.step}; checkpoint saved in {self.run_dir}")
                    break
        bar.close()
        for stream in (self.audio_stream, self.vl_stream):  # stop the persistent loader workers
            if stream is not None:
                stream.close()
        if status == "completed":
            self.evaluate()
            self.save()
        self.write_metrics(status)
        if self.is_main:
            write_plots(self.run_dir)
        self._set_state(status, step=self.step)
        self.logger.close()
        return {"run_dir": str(self.run_dir), "status": status, "step": self.step,
                "validation": self.history[-1] if self.history else {}}


def _select(batch, row: int):
    """One row of a SafeBatch (for per-sample Fisher gradients)."""
    import dataclasses

    def pick(t):
        return None if t is None else t[row : row + 1]

    return dataclasses.replace(batch, input_ids=pick(batch.input_ids), attention_mask=pick(batch.attention_mask),
                               splice_pos=pick(batch.splice_pos), labels=pick(batch.labels),
                               pixel_values=pick(batch.pixel_values), audio=pick(batch.audio),
                               audio_features=pick(batch.audio_features),
                               ids=None if batch.ids is None else batch.ids[row : row + 1])


def train(config: RunConfig) -> dict:
    return Trainer(config).fit()
