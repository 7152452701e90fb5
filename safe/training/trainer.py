"""Stage A training loop (docs/design.md, "Training").

One optimizer step: the retention component refreshes what is due (Fisher, null-space basis); the audio caption
micro-batches run forward and backward; retention adds its VL micro-batches (KL to the gate-0 teacher on the
base's own answers, with a distractor clip) and the Fisher penalty; gradients are averaged across ranks once;
null-space retention projects them, clipping and the non-finite guard follow, and the optimizer's update is
projected again (safe.retention). Every run writes config.json at start, metrics.json after each evaluation,
train_log.jsonl, checkpoints (atomic, resumable) and plots.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from safe.core.errors import SafeError
from safe.data.collate import AudioItems, Items, VQAItems
from safe.retention import build_retention
from safe.retention.gates import gate_openness
from safe.retention.ranks import Ranks
from safe.training import faults
from safe.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from safe.training.config import RunConfig, field_index
from safe.training.data import BatchStream, item_texts, load_run_data
from safe.training.distributed import (
    DistInfo,
    all_true,
    any_true,
    average_gradients,
    average_tensors,
    barrier,
    broadcast_object,
    gather_dict,
    init_distributed,
)
from safe.training.evaluator import Evaluator, distractor_features
from safe.training.features import attach_feature_cache, audio_batch
from safe.training.model_factory import audio_settings, build_model
from safe.training.outputs import RunLogger, environment, new_run_dir, write_json_atomic
from safe.training.plots import write_plots
from safe.training.run_lock import RunLock
from safe.training.schedule import warmup_cosine
from safe.training.tracking import make_sinks

AUDIO_STREAM, VL_STREAM = 0, 1


class StopRequested:
    """SIGTERM, SIGUSR1 and a first Ctrl-C set a flag: the loop checkpoints at the next step boundary and exits
    cleanly. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signal = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)   # the second Ctrl-C interrupts at once
            print("\nCtrl-C: saving a checkpoint at the end of this step (press Ctrl-C again to stop at once).",
                  flush=True)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class ResumeRefused(SafeError):
    """A resume asked for something the saved run cannot give; the run itself is left as it was."""


# Settings a resumed run may change (`--override-on-resume KEY`): how long and how often, not what is trained.
RESUMABLE = {"max_steps", "num_epochs", "eval_every", "save_every", "save_every_minutes", "log_every", "progress",
             "num_workers", "feature_cache_memory_mb", "tensorboard", "wandb_project"}
# Keys of a resume command itself, never compared with the saved run.
RESUME_KEYS = {"resume", "override_on_resume", "re_eval", "output_root"}


def run_state(run_dir: Path) -> str | None:
    path = run_dir / "run_state.json"
    try:
        return json.loads(path.read_text()).get("state") if path.exists() else None
    except (OSError, ValueError):
        return None


def _run_variant(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "config.json").read_text())["config"]["train"]["variant"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_run_dir(config: RunConfig) -> tuple[Path, bool]:
    """A new run folder, or the folder to resume. `--resume auto` takes the newest unfinished run of this variant
    under the output root, whatever its folder is called (found by its config.json and run_state.json)."""
    resume = config.train.resume
    if resume is None:
        return new_run_dir(config.train.output_root, config.train.variant, config.train.run_name), False
    if resume != "auto":
        path = Path(resume)
        if not (path / "config.json").is_file():
            raise SafeError(f"Cannot resume {path}: it is not a run folder (no config.json); pass the folder of a run.")
        if latest_checkpoint(path) is None:
            raise SafeError(f"Cannot resume {path}: it holds no checkpoint; start a new run without --resume.")
        return path, True
    root = Path(config.train.output_root)
    runs = [p for p in (root.iterdir() if root.is_dir() else ())
            if p.is_dir() and _run_variant(p) == config.train.variant and run_state(p) != "completed"
            and latest_checkpoint(p) is not None]
    if runs:
        return max(runs, key=lambda p: (p.stat().st_mtime, p.name)), True
    return new_run_dir(root, config.train.variant, config.train.run_name), False


def manifest_digests(data_root, data) -> dict[str, dict]:
    """Size and sha256 of every manifest the run reads, by path relative to the data root: what a resume on
    another data root (e.g. data staged to node-local scratch) must find unchanged."""
    root = Path(data_root)
    paths = {d.manifest_path for d in (*getattr(data.audio_train, "datasets", [data.audio_train]), data.audio_val,
                                       data.vqa_train, data.vqa_val) if d is not None}
    out = {}
    for path in sorted(paths):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        out[str(Path(path).resolve().relative_to(root.resolve()))] = {"size": Path(path).stat().st_size,
                                                                      "sha256": digest.hexdigest()}
    return out


class Trainer:
    """Stage A: the set-up below reads as a table of contents; `train_step` is one optimizer step."""

    def __init__(self, config: RunConfig, dist_info: DistInfo | None = None, device: torch.device | None = None):
        if dist_info is None:
            dist_info, device = init_distributed()
        assert device is not None, "a Trainer given dist_info needs its device too"
        self.dist, self.device, self.is_main = dist_info, device, dist_info.is_main
        self.config = config
        self.lock: RunLock | None = None
        try:
            self._setup_run_dir()
        except BaseException:
            self._close()   # a refused resume leaves the run as it was
            raise
        try:
            self._setup_data()
            self._check_resumed_data()
            self._setup_model()
            faults.reached("model")
            self._setup_optimizer()
            self._setup_retention()
            self._setup_outputs()
            if self.resuming:
                self._restore()
            if self.previous_state != "completed":
                self._set_state("running")
        except ResumeRefused:
            self._close()
            raise
        except BaseException as exc:
            self._fail(exc)
            raise

    # ------------------------------------------------------------------------------------- set-up

    def _setup_run_dir(self) -> None:
        """The run folder (rank 0 picks, creates and locks it; the others follow), config.json written at start.
        A resumed run is the saved run: its settings come from its config.json."""
        located = resolve_run_dir(self.config) if self.is_main else None
        run_dir, self.resuming = broadcast_object(located and (str(located[0]), located[1]), self.dist)
        self.run_dir = Path(run_dir)
        if self.is_main:
            self.lock = RunLock(self.run_dir).acquire()
        self.overridden: dict = {}
        self.previous_state = run_state(self.run_dir) if self.resuming else None
        if self.resuming:
            self.config = self._saved_config()
        elif self.is_main:
            write_json_atomic(self.run_dir / "config.json", {
                "config": self.config.to_dict(), "environment": environment(),
                "distributed": {"world_size": self.dist.world_size,
                                "global_batch_size": self.global_batch_size(self.config)}})

    def _saved_config(self) -> RunConfig:
        """The run's own configuration; a setting given now that differs from it is an error, except those listed
        in --override-on-resume that may change safely (how long, how often), and a data root holding the same
        manifests (checked once the data are open)."""
        given = self.config
        saved = RunConfig.from_dict(json.loads((self.run_dir / "config.json").read_text())["config"])
        allowed = set(given.train.override_on_resume or ())
        refused = sorted(allowed - RESUMABLE)
        if refused:
            raise ResumeRefused(f"--override-on-resume {' '.join(refused)}: only {', '.join(sorted(RESUMABLE))} "
                            "may change when a run resumes; start a new run to change the others.")
        self.requested_data_root: str | None = None
        for key in given.explicit:
            if key in RESUME_KEYS:
                continue
            mine, theirs = given.value(key), saved.value(key)
            if mine == theirs:
                continue
            if key == "data_root":
                self.requested_data_root = mine
            elif key in allowed:
                self.overridden[key] = {"saved": theirs, "now": mine}
                setattr(getattr(saved, field_index()[key]), key, mine)
            else:
                flag = "--" + key.replace("_", "-")
                hint = f", or pass --override-on-resume {key} to change it" if key in RESUMABLE else ""
                raise ResumeRefused(f"{flag} is {mine!r} but {self.run_dir} was started with {theirs!r}; a resumed run "
                                f"keeps its settings, so leave {flag} out{hint}.")
        for key in ("resume", "override_on_resume", "re_eval"):
            setattr(saved.train, key, getattr(given.train, key))
        saved.train.output_root = str(self.run_dir.parent)
        return saved.validate()

    def _check_resumed_data(self) -> None:
        """A resumed run reads its own data root, or another one that holds the very same manifests (re-staged)."""
        digests = manifest_digests(self.config.data.data_root, self.data)
        if not self.resuming:
            if self.is_main:
                path = self.run_dir / "config.json"
                write_json_atomic(path, {**json.loads(path.read_text()), "data_manifests": digests})
            return
        requested = getattr(self, "requested_data_root", None)
        if requested is None:
            return
        recorded = json.loads((self.run_dir / "config.json").read_text()).get("data_manifests")
        original = self.config.data.data_root
        self.config.data.data_root = requested
        self._setup_data()
        moved = manifest_digests(self.requested_data_root, self.data)
        if recorded is None or moved != recorded:
            raise ResumeRefused(f"--data-root {self.requested_data_root} does not hold the manifests {self.run_dir} "
                            f"was started with (from {original}); resume with the run's own data root, "
                            "or a copy of it.")
        self.overridden["data_root"] = {"saved": original, "now": self.requested_data_root}

    def _setup_data(self) -> None:
        """Every manifest opened and checked before any model is loaded."""
        self.sample_rate, self.clip_seconds = audio_settings(self.config)
        self.data = load_run_data(self.config, self.sample_rate, self.clip_seconds)

    def _setup_model(self) -> None:
        train = self.config.train
        torch.manual_seed(train.seed)
        np.random.seed(train.seed % 2**32)
        if not self.is_main:
            barrier(self.dist)  # rank 0 builds/caches shared artefacts (e.g. the tiny base) first
        self.model = build_model(self.config, self.device)
        if train.activation_checkpointing:
            from safe.models.checkpointing import enable_activation_checkpointing

            enable_activation_checkpointing(self.model)
        if self.is_main:
            barrier(self.dist)
        encoder = self.model.audio_encoder
        if (encoder.sample_rate, encoder.clip_seconds) != (self.sample_rate, self.clip_seconds):
            raise RuntimeError(f"audio encoder expects {encoder.sample_rate} Hz / {encoder.clip_seconds} s but the "
                               f"data were set up for {self.sample_rate} Hz / {self.clip_seconds} s")
        self.feature_cache = attach_feature_cache(self.config, encoder, self._audio_datasets())
        if self.data.vqa_train is not None:  # images preprocessed in the loader workers, not in the step
            self.data.vqa_train.image_processor = self.model.builder.image_processor
        # Every training caption tokenised once, in batched calls, instead of a few at a time in each step.
        captions = item_texts(self.data.audio_train)
        self.model.builder.warm([self.model.builder.caption_prompt()] * len(captions), captions)
        self.params = self.model.named_trainable_parameters()

    def _setup_optimizer(self) -> None:
        """AdamW (fused: one kernel over all tensors, 1.3 -> 0.55 ms a step on CPU), the batch streams, warm-up then
        cosine in optimizer steps."""
        train = self.config.train
        self.optimizer = torch.optim.AdamW(
            self.model.param_groups(train.lr_projector, train.lr_adapter, train.weight_decay), fused=True)
        shard: dict[str, Any] = dict(rank=self.dist.rank, world_size=self.dist.world_size,
                                     length_grouping=train.length_grouping)
        workers = self.config.data.num_workers
        self.audio_stream = BatchStream(self.data.audio_train, train.train_batch_size, train.seed, AUDIO_STREAM,
                                        workers, mix=self.data.source_mix, **shard)
        self.vl_stream = BatchStream(self.data.vqa_train, train.train_batch_size, train.seed, VL_STREAM, workers,
                                     **shard) if self.data.vqa_train is not None else None
        self.total_steps = train.max_steps or train.num_epochs * math.ceil(
            self.audio_stream.batches_per_epoch / train.gradient_accumulation_steps)
        self.warmup_steps = train.warmup_steps if train.warmup_steps is not None else max(1, self.total_steps // 20)
        self.scheduler = warmup_cosine(self.optimizer, self.warmup_steps, self.total_steps)

    def _setup_retention(self) -> None:
        self.retention = build_retention(
            self.model, self.config, next_vl_batch=self._next_vl_batch,
            distractors=self._training_distractors, autocast=self._autocast,
            ranks=Ranks(self.dist.rank, self.dist.world_size, functools.partial(average_tensors, info=self.dist),
                        functools.partial(any_true, info=self.dist)),
            log=lambda record: self.logger.log(record))

    def _setup_outputs(self) -> None:
        train = self.config.train
        self.step = 0
        self.saved_step, self.saved_at = -1, time.monotonic()
        self.history: list[dict] = []
        self.unreported_skips: list[dict] = []  # a rank other than 0's unreadable samples, not yet sent to rank 0
        self.schedule_kept: dict | None = None  # set when a resume on another number of GPUs kept the schedule
        self.counters = {"nonfinite_skipped_steps": 0, "consecutive_nonfinite": 0, "skipped_samples": 0,
                         "audio_samples": 0, "train_seconds": 0.0}
        sinks = make_sinks(self.run_dir, train.tensorboard, train.wandb_project, self.config.to_dict()) \
            if self.is_main else []
        self.logger = RunLogger(self.run_dir, enabled=self.is_main, sinks=sinks)
        self.evaluator = Evaluator.for_run(self.model, self.data, self.config, self.run_dir, self.device, self.dist)
        self.evaluator.feature_cache = self.feature_cache
        if self.data.wavcaps_dropped_overlap and self.is_main:
            print(f"WavCaps: dropped {self.data.wavcaps_dropped_overlap} training rows that are AudioCaps val/test "
                  "clips or blacklisted (never trained on what is evaluated).")
        self.logger.log({"event": "start", "world_size": self.dist.world_size,
                         "global_batch_size": self.global_batch_size(self.config), "total_steps": self.total_steps,
                         "wavcaps_dropped_overlap": self.data.wavcaps_dropped_overlap,
                         "eval_distractor_source": self.data.eval_distractor_source})

    def _audio_datasets(self):
        train = self.data.audio_train
        return [*getattr(train, "datasets", [train]), self.data.audio_val, self.data.distractor_pool,
                self.data.eval_distractors]

    # ------------------------------------------------------------------------------------- state

    def global_batch_size(self, config: RunConfig) -> int:
        """Audio samples per optimizer step: per-rank batch × world size × accumulation."""
        train = config.train
        return train.train_batch_size * self.dist.world_size * train.gradient_accumulation_steps

    def _set_state(self, state: str, **extra) -> None:
        if self.is_main:
            write_json_atomic(self.run_dir / "run_state.json", {"state": state, **extra})
            if state != "failed":  # a resumed or finished run: an earlier attempt's rank failures go into the log
                for note in sorted(self.run_dir.glob("run_state.rank*.json")):
                    if hasattr(self, "logger"):
                        self.logger.log({"event": "earlier_rank_failure", "file": note.name,
                                         **json.loads(note.read_text())})
                    note.unlink(missing_ok=True)
        elif state == "failed" and getattr(self, "run_dir", None) is not None:
            # Rank 0 is usually killed by torchrun before it could say why: each rank records its own failure.
            write_json_atomic(self.run_dir / f"run_state.rank{self.dist.rank}.json", {"state": state, **extra})

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "schedule": {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
            "audio_stream": self.audio_stream.state(),
            "vl_stream": self.vl_stream.state() if self.vl_stream else None,
            "retention": self.retention.state_dict() if self.retention else None,
            "counters": json.dumps(self.counters),
            "history": json.dumps(self.history),  # evaluations are recorded with their checkpoint
        }

    def _collect_skips(self) -> None:
        """Bring the other ranks' unreadable samples to rank 0, which counts them in metrics.json and logs them
        (only rank 0 writes the log). A collective: every rank calls it at the same points."""
        if not self.dist.enabled:
            return
        parts = gather_dict({self.dist.rank: self.unreported_skips}, self.dist)
        self.unreported_skips = []
        if not self.is_main:
            return
        for rank, records in sorted(parts.items()):  # rank 0's own list is empty: it logged its skips as they came
            self.counters["skipped_samples"] += len(records)
            for record in records:
                self.logger.log({"event": "skipped_sample", "rank": rank, **record})

    def save(self) -> None:
        """Rank 0 writes (all ranks hold the same trainable state); the others wait for it."""
        self._collect_skips()  # before the counters are checkpointed
        # Cache entries this run computed reach the disk with the checkpoint, so a resumed run reads the same bits.
        for cache in (self.feature_cache, self.retention.base_work if self.retention is not None else None):
            if cache is not None:
                cache.flush()
        if self.is_main:
            meta = {"variant": self.config.train.variant, "total_steps": self.total_steps,
                    "world_size": self.dist.world_size}
            save_checkpoint(self.run_dir, self.step, self.model, self._trainer_state(), meta)
        barrier(self.dist)
        self.saved_step, self.saved_at = self.step, time.monotonic()

    def _keep_schedule(self, saved: dict | None) -> None:
        """A run resumed on another number of GPUs keeps its learning-rate schedule: with --num-epochs the step
        count follows the global batch, and recomputing it would move the cosine under the saved step (8 -> 4 GPUs
        doubles it, so the rate climbs back up). The price: the run then sees a different number of epochs than
        --num-epochs, which metrics.json records (training.schedule_kept). Changing max_steps or num_epochs on
        purpose (--override-on-resume) still takes effect."""
        if saved is None or any(key in self.overridden for key in ("max_steps", "num_epochs")):
            return
        now = {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}
        if saved == now:
            return
        self.total_steps, self.warmup_steps = saved["total_steps"], saved["warmup_steps"]
        self.scheduler = warmup_cosine(self.optimizer, self.warmup_steps, self.total_steps)
        self.schedule_kept = {"step": self.step, "saved": saved, "recomputed": now,
                              "world_size": self.dist.world_size}
        self.logger.log({"event": "schedule_kept", **self.schedule_kept})
        if self.is_main:
            print(f"resume: keeping the run's schedule ({saved['total_steps']} steps, {saved['warmup_steps']} of "
                  f"warm-up) rather than the {now['total_steps']} steps this number of GPUs would give")

    def _restore(self) -> None:
        path = latest_checkpoint(self.run_dir)
        assert path is not None  # resolve_run_dir resumes only a run that holds a checkpoint
        state = load_checkpoint(path, self.model)
        self.step = state["step"]
        self._keep_schedule(state.get("schedule"))  # before the optimizer's state: a new scheduler resets the rates
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.audio_stream.load_state(state["audio_stream"])
        if self.vl_stream and state["vl_stream"]:
            self.vl_stream.load_state(state["vl_stream"])
        if self.retention is not None and state.get("retention"):
            self.retention.load_state_dict(state["retention"])
        self.counters = json.loads(state["counters"])
        set_rng_state(state["rng"])
        # The checkpoint's own history: an evaluation written to metrics.json after it (a crash in between) is
        # repeated, not duplicated (evaluate() keeps one entry per step).
        self.history = json.loads(state.get("history", "[]"))
        self.saved_step = self.step
        self.logger.log({"event": "resumed", "step": self.step, "checkpoint": path.name,
                         "overridden": self.overridden})

    # ------------------------------------------------------------------------------------ batches

    def _autocast(self):
        if self.device.type == "cuda" and self.config.train.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _next_vl_batch(self) -> VQAItems:
        assert self.vl_stream is not None  # retention asks for VQA batches only when the run has VQA data
        collated = self._next_batch(self.vl_stream)
        assert isinstance(collated, VQAItems), "the VQA stream yields VQA batches"
        return collated

    def _next_batch(self, stream: BatchStream) -> Items:
        """The next batch with at least one loadable sample; bad samples are counted, never replaced."""
        for _ in range(1000):
            collated = stream.next()
            self.counters["skipped_samples"] += len(collated.skipped)
            for bad in collated.skipped:
                self.logger.log({"event": "skipped_sample", "step": self.step, **bad})
                if not self.is_main:  # rank 0 counts and logs it at the next checkpoint or evaluation
                    self.unreported_skips.append({"step": self.step, **bad})
            if collated.size:
                return collated
        raise SafeError("No training sample could be loaded in 1000 batches; run `safe data validate`.")

    def _training_distractors(self, keys: list) -> torch.Tensor:
        """Training clips as distractors for VL retention batches, drawn from (training seed, key)."""
        return distractor_features(self.model, self.data.distractor_pool, keys, self.config.train.seed,
                                   self.feature_cache)

    # --------------------------------------------------------------------------------------- step

    def train_step(self) -> dict:
        config = self.config
        accumulation = config.train.gradient_accumulation_steps
        self.model.train()
        if self.retention is not None:
            self.retention.refresh(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        # Losses stay tensors until the step ends: one host sync a step instead of one per micro-batch.
        zero = torch.zeros((), device=self.device)
        losses = {"caption_loss": zero, "kl_loss": zero, "fisher_penalty": zero}
        for _ in range(accumulation):
            collated = self._next_batch(self.audio_stream)
            assert isinstance(collated, AudioItems), "the audio stream yields audio batches"
            batch = audio_batch(self.model, collated, self.feature_cache).to(self.device)
            with self._autocast():
                loss = self.model(batch, gate=1.0, label_smoothing=config.train.label_smoothing).loss.float()
            (loss / accumulation).backward()
            losses["caption_loss"] = losses["caption_loss"] + loss.detach() / accumulation
            self.counters["audio_samples"] += batch.size
        if self.retention is not None:
            losses.update(self.retention.backward(self.step, accumulation))
        average_gradients(list(self.params.values()), self.dist)  # once per optimizer step (DDP's no_sync)
        if self.retention is not None:
            self.retention.project_gradients()
        # One non-finite check for the whole step: a NaN/inf in any loss or gradient makes the total gradient
        # norm (computed anyway for clipping) non-finite. Clipping scales gradients in place, so a bad step's
        # gradients are dropped below before the optimizer could see them.
        grads = [p for p in self.params.values() if p.grad is not None]
        total_norm = torch.nn.utils.clip_grad_norm_(grads, config.train.grad_clip) if grads else zero
        # The losses logged are the mean over ranks, as the gradients are (the norm is of the averaged gradients);
        # a non-finite loss on any rank makes its mean non-finite everywhere.
        mean_losses = average_tensors({"losses": torch.stack(list(losses.values()))}, self.dist)["losses"]
        figures = torch.cat([total_norm.float().to(self.device)[None], mean_losses]).tolist()  # one sync for all
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
            with self.retention.protected_update() if self.retention is not None else contextlib.nullcontext():
                self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {**losses, "grad_norm": grad_norm, "finite": finite,
                "lr_projector": self.optimizer.param_groups[0]["lr"], "max_abs_tanh_alpha": self.max_abs_tanh_alpha()}

    def max_abs_tanh_alpha(self) -> float | None:
        """How open the fusion gates are: the largest |gate| (None for prefix fusion, which has none)."""
        return gate_openness(self.model)

    # ---------------------------------------------------------------------------------------- run

    def evaluate(self) -> dict:
        """One evaluation, recorded once per step; a failure is one sentence, and the checkpoint of this step
        (always saved before an evaluation) is kept for --resume to evaluate again."""
        try:
            metrics = self.evaluator.run(self.step)
            faults.reached("eval")
        except SafeError:
            raise
        except Exception as exc:
            raise SafeError(f"The evaluation at step {self.step} failed ({type(exc).__name__}: {exc}); the checkpoint "
                            f"of step {self.step} is kept, so fix the cause and resume with `safe train --resume "
                            f"{self.run_dir}` to evaluate it again.") from exc
        self.history = [h for h in self.history if h.get("step") != self.step] + [metrics]
        self.logger.log({"event": "eval", **metrics})
        self._collect_skips()
        mix = self.audio_stream.source_mix()
        if mix:  # flat keys (wavcaps_realised, ...) so the trackers plot the realised mix as well
            self.logger.log({"event": "source_mix", "step": self.step, **{
                f"{name}_{key}": value for name, figures in mix.items() for key, value in figures.items()}})
        self.write_metrics()
        faults.reached("metrics")
        return metrics

    def write_metrics(self, status: str = "running") -> None:
        if not self.is_main:
            return
        train = self.config.train
        seconds = max(self.counters["train_seconds"], 1e-9)
        vl_samples = self.retention.vl_samples if self.retention is not None else 0
        # Counters are rank 0's; every rank sees the same number of samples per step.
        samples = (self.counters["audio_samples"] + vl_samples) * self.dist.world_size
        write_json_atomic(self.run_dir / "metrics.json", {
            "validation": self.history[-1] if self.history else {},
            "history": self.history,
            "training": {"variant": train.variant, "step": self.step, "total_steps": self.total_steps,
                         "status": status, **{k: v for k, v in self.counters.items() if k != "consecutive_nonfinite"},
                         "vl_samples": vl_samples, "max_abs_tanh_alpha": self.max_abs_tanh_alpha(),
                         "base_work_cache": self.retention.base_work.stats
                         if self.retention is not None and self.retention.base_work is not None else None,
                         "wavcaps_dropped_overlap": self.data.wavcaps_dropped_overlap,
                         "world_size": self.dist.world_size, "global_batch_size": self.global_batch_size(self.config),
                         "schedule_kept": self.schedule_kept,
                         "source_mix": self.audio_stream.source_mix()},
            "throughput": {"samples_per_second": samples / seconds, "steps_per_second": self.step / seconds,
                           "seconds_per_step": seconds / max(self.step, 1)},
        })

    def _evaluated(self, step: int) -> bool:
        return any(h.get("step") == step for h in self.history)

    def fit(self) -> dict:
        train = self.config.train
        if self.previous_state == "completed" and not train.re_eval:
            print(f"{self.run_dir} is already completed (step {self.step}); nothing to do (--re-eval evaluates its "
                  "last checkpoint again).")
            self._close()
            return self._result("completed")
        try:
            status = self._loop()
            if status == "completed":
                if self.saved_step != self.step:
                    self.save()                  # the final checkpoint first: a failed evaluation loses nothing
                if train.re_eval or not self._evaluated(self.step):
                    self.evaluate()
        except BaseException as exc:
            self._fail(exc)
            raise
        self._collect_skips()
        self.write_metrics(status)
        if self.is_main:
            write_plots(self.run_dir)
        self._set_state(status, step=self.step)
        self._close()
        return self._result(status)

    def _loop(self) -> str:
        """Optimizer steps until the end or a stop signal; checkpoints by steps, by wall time and before each
        evaluation. Returns "completed" or "interrupted"."""
        train = self.config.train
        eval_every, save_every = train.eval_every, train.save_every
        # A resumed run whose last checkpoint is an evaluation step the history lacks (killed during or right
        # after that evaluation) evaluates it first.
        if self.resuming and eval_every and 0 < self.step < self.total_steps and self.step % eval_every == 0 \
                and not self._evaluated(self.step):
            self.evaluate()
        bar = tqdm(total=self.total_steps, initial=self.step, desc=train.variant,
                   disable=not (train.progress and self.is_main), dynamic_ncols=True)
        status = "completed"
        with StopRequested() as stop:
            while self.step < self.total_steps:
                started = time.perf_counter()
                record = self.train_step()
                faults.reached("step")
                elapsed = time.perf_counter() - started
                self.counters["train_seconds"] += elapsed
                if self.step % train.log_every == 0 or self.step == 1:
                    self.logger.log({"event": "train", "step": self.step, **record, "step_seconds": round(elapsed, 4)})
                bar.update(1)
                bar.set_postfix(loss=f"{record['caption_loss']:.3f}", kl=f"{record['kl_loss']:.3f}",
                                lr=f"{record['lr_projector']:.1e}",
                                sps=f"{train.train_batch_size * train.gradient_accumulation_steps / elapsed:.1f}")
                if self.step >= self.total_steps:
                    break
                evaluate = bool(eval_every and self.step % eval_every == 0)
                minutes = train.save_every_minutes
                due = (save_every and self.step % save_every == 0) or \
                    (minutes and time.monotonic() - self.saved_at >= 60 * minutes)
                if evaluate or any_true(bool(due), self.dist):
                    self.save()
                stopping = any_true(stop.signal is not None, self.dist)  # asked for before or during the save
                if evaluate and not stopping:
                    # A stop asked for before it defers the evaluation (at 7B it can outlast SLURM's grace
                    # period): the resumed run evaluates this step first.
                    self.evaluate()
                    stopping = any_true(stop.signal is not None, self.dist)
                if stopping:
                    if self.saved_step != self.step:
                        self.save()
                    status = "interrupted"
                    name = signal.Signals(stop.signal).name if stop.signal else "a signal"
                    self.logger.log({"event": "interrupted", "signal": stop.signal, "step": self.step})
                    bar.write(f"stopped by {name} at step {self.step}; checkpoint saved. Continue with: "
                              f"safe train --resume {self.run_dir}")
                    break
        bar.close()
        return status

    def _fail(self, exc: BaseException) -> None:
        """Record why the run stopped: `failed` with the error in one sentence (interrupted for a second Ctrl-C)."""
        if isinstance(exc, KeyboardInterrupt):
            self._set_state("interrupted", step=getattr(self, "step", 0), error="stopped at once by a second Ctrl-C; "
                            "the last checkpoint is kept")
        else:
            message = str(exc) if isinstance(exc, SafeError) else f"{type(exc).__name__}: {exc}"
            self._set_state("failed", step=getattr(self, "step", 0), error=" ".join(message.split()))
        if hasattr(self, "logger"):
            self.write_metrics("failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted")
        self._close()

    def _close(self) -> None:
        for stream in (getattr(self, "audio_stream", None), getattr(self, "vl_stream", None)):
            if stream is not None:
                stream.close()    # stop the persistent loader workers
        if hasattr(self, "logger"):
            self.logger.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _result(self, status: str) -> dict:
        return {"run_dir": str(self.run_dir), "status": status, "step": self.step,
                "validation": self.history[-1] if self.history else {}}


def train(config: RunConfig) -> dict:
    return Trainer(config).fit()
