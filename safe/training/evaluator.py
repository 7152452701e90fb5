"""One evaluation of a SAFE model: what metrics.json reports (docs/metrics.md defines every key).

- Captions (gate 1) on the audio evaluation clips, with two controls: *shuffled* (the same model, each clip
  captioned with another clip's audio, a seeded derangement: does it listen?) and *muted* (the base without
  audio: what does the audio add over the base?).
- VQA: the base (gate 0), SAFE without audio (gate 1: the base by construction) and SAFE with a distractor clip
  drawn from clips never trained on; the distractor delta compares the last two, in the same run and batches.
- Paired bootstrap intervals for the two deltas that carry the science (listening gain, distractor delta).
- gate0_exact: g = 0 with audio, and g = 1 without audio, give logits torch.equal to the bare base.

The base's own answers are computed once and cached on disk under a key that holds everything they depend on
(base, data, prompt, decoding, dtype, device type, batch size, world size, library versions), so later
evaluations and other variants reuse them. Predictions of each evaluation are written next to the metrics, with
the evaluated ids, so any number can be audited.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from safe.core.cache import cache_dir
from safe.data.collate import AudioItems, collate_samples
from safe.data.feature_cache import FeatureCache
from safe.data.manifest import write_jsonl
from safe.eval.bootstrap import paired_bootstrap_ci
from safe.eval.captions import caption_metrics
from safe.eval.listening import SwappedAudio, derangement
from safe.eval.vqa import vqa_score
from safe.training.distributed import DistInfo, all_true, barrier, gather_dict
from safe.training.features import audio_batch, batch_features
from safe.training.outputs import write_json_atomic


def _file_key(path: Path) -> dict:
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def numerics_key(model, batch_size: int, world_size: int) -> dict:
    """What greedy answers depend on besides the inputs: bf16 on a GPU and fp32 on a CPU, or another batch size
    (padding, batch mates) or library version, can change a greedy answer; a cache must not mix them."""
    import transformers

    return {"dtype": str(next(model.base.parameters()).dtype), "device": model.device.type,
            "batch_size": batch_size, "world_size": world_size, "torch": torch.__version__,
            "transformers": transformers.__version__}


class BasePredictionCache:
    """Gate-0 answers per (base, data, prompt, decoding, numerics): the base never changes, so neither do they."""

    def __init__(self, model, decoding: dict, directory: Path | None = None, batch_size: int = 16,
                 world_size: int = 1):
        from safe.models.safe_model import base_fingerprint

        self.directory = directory or cache_dir("base_predictions")
        builder = model.builder
        self.base = {"name": model.base_name, "fingerprint": base_fingerprint(model.base),
                     "prompts": builder.style.to_dict(), "images": type(builder.image_processor).__name__,
                     "pad_to_square": bool(getattr(builder.image_processor, "do_pad", False))}
        self.decoding = decoding
        self.numerics = numerics_key(model, batch_size, world_size)
        self.hits = 0

    def _path(self, kind: str, manifest: Path, ids: list) -> Path:
        key = json.dumps({"kind": kind, "base": self.base, "manifest": _file_key(manifest),
                          "decoding": self.decoding, "numerics": self.numerics,
                          "ids": hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()},
                         sort_keys=True)
        return self.directory / f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def get_or_compute(self, kind: str, manifest: Path, ids: list, compute, info: DistInfo = DistInfo()) -> dict:
        """Cached predictions, else `compute()` (collective under torchrun: every rank takes the same branch)."""
        path = self._path(kind, manifest, ids)
        cached: Any = None
        if path.is_file():
            try:
                cached = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                cached = None  # a damaged entry is recomputed
        if all_true(cached is not None and len(cached) == len(ids), info):
            self.hits += 1
            return cached
        predictions = {str(k): v for k, v in compute().items()}
        if info.is_main:
            write_json_atomic(path, predictions)
        barrier(info)
        return predictions


def distractor_features(model, pool, keys: list, seed: int, feature_cache=None, salt: int = 0) -> torch.Tensor:
    """Encoder features [B, T, D] of one clip of ``pool`` per key, each drawn from (seed, salt, key): the same keys
    always get the same clips. An unreadable clip is skipped and another drawn."""
    clips = []
    for key in keys:
        digest = int(hashlib.sha256(f"{seed}:{salt}:{key}".encode()).hexdigest()[:15], 16)
        rng = np.random.default_rng(digest)
        for _ in range(16):
            item = pool[int(rng.integers(len(pool)))]
            if item["kind"] == "audio":
                clips.append(item)
                break
        else:
            raise RuntimeError("could not load any distractor clip: 16 draws in a row were unreadable")
    collated = collate_samples(clips)
    assert isinstance(collated, AudioItems)
    return batch_features(collated, model, feature_cache)


class Evaluator:
    """Runs one evaluation of a SAFEModel on the audio and VQA evaluation sets."""

    def __init__(self, model, audio_val, vqa_val, distractors, config, run_dir: Path | None,
                 device: torch.device, base_cache: BasePredictionCache | None = None, info: DistInfo = DistInfo(),
                 distractor_source: str = "audiocaps val"):
        self.model = model
        self.info = info
        self.feature_cache: FeatureCache | None = None  # set by the trainer when the feature cache is on
        self.audio_val = audio_val
        self.vqa_val = vqa_val
        if vqa_val is not None:  # images preprocessed in the loader workers, not in the evaluation loop
            vqa_val.image_processor = model.builder.image_processor
        self.distractors = distractors  # clips never trained on
        self.distractor_source = distractor_source
        self.config = config
        self.seed = config.data.eval_seed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = device
        train = config.train
        self.decoding = {"max_new_tokens": train.generation_max_new_tokens, "num_beams": train.num_beams}
        self.base_cache = base_cache or BasePredictionCache(model, self.decoding, batch_size=train.val_batch_size,
                                                            world_size=info.world_size)

    @classmethod
    def for_run(cls, model, data, config, run_dir: Path | None, device: torch.device, info: DistInfo = DistInfo(),
                base_cache: BasePredictionCache | None = None) -> "Evaluator":
        """The evaluator of a run's data (safe.training.data.RunData)."""
        return cls(model, data.audio_val, data.vqa_val, data.eval_distractors, config, run_dir, device, base_cache,
                   info, distractor_source=data.eval_distractor_source)

    def _loader(self, dataset):
        """This rank's shard (every world_size-th item); results are gathered before any metric."""
        if self.info.enabled:
            dataset = Subset(dataset, range(self.info.rank, len(dataset), self.info.world_size))
        return DataLoader(dataset, batch_size=self.config.train.val_batch_size, shuffle=False,
                          collate_fn=collate_samples, num_workers=self.config.data.num_workers)

    def _generate(self, batch, gate: float) -> list[str]:
        return self.model.generate(batch.to(self.device), gate=gate, **self.decoding)

    # ------------------------------------------------------------------------------------- captions

    def _caption_pass(self, dataset) -> tuple[dict, dict, int]:
        """Gate-1 captions of ``dataset``'s items: (predictions by id, references by id, skipped count)."""
        predictions: dict = {}
        references: dict = {}
        skipped = 0
        for collated in self._loader(dataset):
            skipped += len(collated.skipped)
            if not collated.size:
                continue
            batch = audio_batch(self.model, collated, self.feature_cache, with_answers=False)
            predictions.update(zip(map(str, collated.ids), self._generate(batch, gate=1.0)))
            references.update(zip(map(str, collated.ids), collated.references))
        skipped = sum(gather_dict({self.info.rank: skipped}, self.info).values())
        return gather_dict(predictions, self.info), gather_dict(references, self.info), skipped

    def _captions(self) -> tuple[dict, dict, dict, dict, int]:
        predictions, references, skipped = self._caption_pass(self.audio_val)
        # The listening control: every clip captioned with another evaluated clip's audio.
        shuffled: dict = {}
        if len(self.audio_val) >= 2:
            shuffled, _, _ = self._caption_pass(SwappedAudio(self.audio_val, derangement(len(self.audio_val),
                                                                                         self.seed)))
            shuffled = {k: v for k, v in shuffled.items() if k in predictions}
        builder = self.model.builder

        def compute_muted():
            # The audio path off: the base answers the caption prompt with no audio, so only the clip ids are
            # needed (no second decode of the clips). This rank's share of the ids, gathered.
            mine = sorted(predictions)[self.info.rank :: self.info.world_size]
            size = self.config.train.val_batch_size
            out: dict = {}
            for start in range(0, len(mine), size):
                chunk = mine[start : start + size]
                batch = builder.caption_batch(None, batch_size=len(chunk), ids=chunk)
                out.update(zip(chunk, self._generate(batch, gate=0.0)))
            return gather_dict(out, self.info)

        muted = self.base_cache.get_or_compute("captions", self.audio_val.manifest_path, sorted(predictions),
                                               compute_muted, self.info)
        return predictions, shuffled, {k: muted[k] for k in predictions}, references, skipped

    # ------------------------------------------------------------------------------------------ VQA

    def distractor_audio(self, ids: list, salt: int = 0) -> torch.Tensor:
        """Encoder features of one held-out clip per question, drawn from (eval seed, salt, question id), so every
        evaluation, and every run with the same eval seed, uses the same distractors."""
        return distractor_features(self.model, self.distractors, ids, self.seed, self.feature_cache, salt)

    def _vqa(self) -> tuple[dict, dict, dict, dict, dict, int]:
        builder = self.model.builder
        safe: dict = {}
        distractor: dict = {}
        answers: dict = {}
        answer_types: dict = {}
        skipped = 0
        for collated in self._loader(self.vqa_val):
            skipped += len(collated.skipped)
            if not collated.size:
                continue
            ids = [str(i) for i in collated.ids]
            batch = builder.from_collated(collated, with_answers=False)
            safe.update(zip(ids, self._generate(batch, gate=1.0)))
            with_audio = batch.with_audio(audio_features=self.distractor_audio(collated.ids))
            distractor.update(zip(ids, self._generate(with_audio, gate=1.0)))
            answers.update(zip(ids, collated.answers))
            answer_types.update(zip(ids, collated.answer_types))
        safe, distractor = gather_dict(safe, self.info), gather_dict(distractor, self.info)
        answers, answer_types = gather_dict(answers, self.info), gather_dict(answer_types, self.info)
        skipped = sum(gather_dict({self.info.rank: skipped}, self.info).values())

        def compute_base():
            out: dict = {}
            for collated in self._loader(self.vqa_val):
                if collated.size:
                    batch = builder.from_collated(collated, with_answers=False)
                    out.update(zip(map(str, collated.ids), self._generate(batch, gate=0.0)))
            return gather_dict(out, self.info)

        base = self.base_cache.get_or_compute("vqa", self.vqa_val.manifest_path, sorted(safe), compute_base,
                                              self.info)
        return {k: base[k] for k in safe}, safe, distractor, answers, answer_types, skipped

    # ----------------------------------------------------------------------------------- gate check

    @torch.no_grad()
    def gate0_exact(self) -> bool:
        """g = 0 with audio attached, and g = 1 without audio, give logits torch.equal to the bare base."""
        model = self.model
        collated = collate_samples([self.vqa_val[i] for i in range(min(2, len(self.vqa_val)))])
        if not collated.size:
            return False
        batch = model.builder.from_collated(collated, with_answers=True).to(self.device)
        bare = model.base(**model.base_inputs(batch)).logits
        features = self.distractor_audio(collated.ids, salt=1)
        gate0 = model(batch.with_audio(audio_features=features), gate=0.0).logits
        no_audio = model(batch.with_audio(None), gate=1.0).logits
        return bool(torch.equal(bare, gate0) and torch.equal(bare, no_audio))

    # --------------------------------------------------------------------------------------- driver

    @torch.no_grad()
    def run(self, step: int) -> dict:
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        try:
            predictions, shuffled, muted, references, audio_skipped = self._captions()
            base, safe, distractor, answers, answer_types, vl_skipped = self._vqa()
            exact = all_true(self.gate0_exact(), self.info)
        finally:
            self.model.train(was_training)
        # Scores are means over items: a fixed item order makes them bit-identical however the predictions were
        # gathered (one process, or shards from several ranks).
        predictions, shuffled, muted, references, base, safe, distractor, answers = (
            dict(sorted(d.items())) for d in (predictions, shuffled, muted, references, base, safe, distractor,
                                              answers))
        metrics = self._scores(predictions, shuffled, muted, references, base, safe, distractor, answers)
        metrics.update(gate0_exact=exact, eval_skipped_samples=audio_skipped + vl_skipped,
                       eval_seconds=round(time.perf_counter() - started, 3), step=step)
        if self.run_dir is not None and self.info.is_main:
            self._write_predictions(step, predictions, shuffled, muted, references, base, safe, distractor, answers,
                                    answer_types)
        return metrics

    def _scores(self, predictions, shuffled, muted, references, base, safe, distractor, answers) -> dict:
        captions = caption_metrics(predictions, references, per_item=True)
        matched_items = captions.pop("cider_per_item")
        muted_cider = caption_metrics(muted, references, cider_only=True)["cider"]
        metrics = {f"audio_{k}": v for k, v in captions.items() if k not in ("n", "note")}
        listen: dict[str, Any] = {"audio_cider_shuffled": None, "audio_listen_gain": None, "audio_listen_gain_ci": None}
        if len(shuffled) >= 2:
            # Scored on the clips both passes captioned, with the same references (so the same IDF): the gain is
            # then exactly the mean of the per-clip differences that the bootstrap resamples.
            same = {k: references[k] for k in shuffled}
            swapped = caption_metrics(shuffled, same, cider_only=True, per_item=True)["cider_per_item"]
            matched = matched_items if len(same) == len(predictions) else caption_metrics(
                {k: predictions[k] for k in same}, same, cider_only=True, per_item=True)["cider_per_item"]
            listen.update(audio_cider_shuffled=float(np.mean(list(swapped.values()))),
                          audio_listen_gain=float(np.mean([matched[k] - swapped[k] for k in swapped])),
                          audio_listen_gain_ci=paired_bootstrap_ci(matched, swapped, seed=self.seed))
        base_scores, safe_scores, distractor_scores = (vqa_score(d, answers) for d in (base, safe, distractor))
        base_acc, safe_acc, distractor_acc = (s["accuracy"] for s in (base_scores, safe_scores, distractor_scores))
        metrics.update(
            audio_cider_muted=muted_cider,
            audio_gain=captions["cider"] - muted_cider,
            **listen,
            audio_samples=len(predictions),
            audio_split_samples=self.audio_val.split_size,
            audio_listen_samples=len(shuffled) if listen["audio_listen_gain"] is not None else 0,
            audio_metrics_note=captions["note"],
            vl_base_accuracy=base_acc,
            vl_safe_accuracy=safe_acc,
            vl_safe_distractor_accuracy=distractor_acc,
            vl_delta=safe_acc - base_acc,
            vl_distractor_delta=distractor_acc - safe_acc,
            vl_distractor_delta_ci=paired_bootstrap_ci(distractor_scores["per_question"], safe_scores["per_question"],
                                                       seed=self.seed),
            vl_distractor_source=self.distractor_source,
            vl_samples=len(safe),
            vl_split_samples=self.vqa_val.split_size,
        )
        return metrics

    def _write_predictions(self, step, predictions, shuffled, muted, references, base, safe, distractor, answers,
                           answer_types) -> None:
        assert self.run_dir is not None  # only called for a run with a folder
        folder = self.run_dir / "predictions" / f"step_{step:08d}"
        write_jsonl(folder / "captions.jsonl",
                    ({"id": k, "prediction": predictions[k], "shuffled_audio": shuffled.get(k), "muted": muted[k],
                      "references": references[k]} for k in predictions))
        write_jsonl(folder / "vqa.jsonl",
                    ({"question_id": k, "base": base[k], "safe": safe[k], "safe_distractor": distractor[k],
                      "answers": answers[k], "answer_type": answer_types[k]} for k in safe))
        write_json_atomic(folder / "evaluated_ids.json", {
            "eval_seed": self.seed, "audio_split": self.audio_val.split, "audio_ids": list(predictions),
            "vl_split": self.vqa_val.split, "vl_question_ids": list(safe),
            "distractor_source": self.distractor_source})
