"""Evaluation of DESIGN §6: captions (with the muted control), VQA base/safe/distractor, and gate0_exact.

Everything the base model (gate 0) answers is computed once per run and cached on disk keyed by the base,
the data, the prompt and the decoding settings, so later evaluations and other variants reuse it.
Predictions of each evaluation are written next to the metrics for auditing.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from safe.cache import cache_dir
from safe.data.datasets import collate_samples
from safe.data.manifest import write_jsonl
from safe.eval.captions import caption_metrics
from safe.eval.vqa import vqa_score
from safe.models.prompts import CAPTION_PROMPT, VQA_PROMPT
from safe.training.distributed import DistInfo, all_true, barrier, gather_dict
from safe.training.features import audio_batch, batch_features
from safe.training.outputs import write_json_atomic


def _file_key(path: Path) -> dict:
    stat = Path(path).stat()
    return {"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class BasePredictionCache:
    """Gate-0 answers per (base model, manifest, prompt, decoding): the base never changes, so neither do they."""

    def __init__(self, model, decoding: dict, directory: Path | None = None):
        from safe.models.safe_model import base_fingerprint

        self.directory = directory or cache_dir("base_predictions")
        self.base = {"name": model.base_name, "fingerprint": base_fingerprint(model.base)}
        self.decoding = decoding
        self.hits = 0

    def _path(self, kind: str, manifest: Path, ids: list) -> Path:
        key = json.dumps({"kind": kind, "base": self.base, "manifest": _file_key(manifest),
                          "prompt": VQA_PROMPT if kind == "vqa" else CAPTION_PROMPT, "decoding": self.decoding,
                          "ids": hashlib.sha256(json.dumps([str(i) for i in ids]).encode()).hexdigest()},
                         sort_keys=True)
        return self.directory / f"{kind}_{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def get_or_compute(self, kind: str, manifest: Path, ids: list, compute, info: DistInfo = DistInfo()) -> dict:
        """Cached predictions, else `compute()` (collective under torchrun: every rank takes the same branch)."""
        path = self._path(kind, manifest, ids)
        cached = None
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


class Evaluator:
    """Runs one evaluation of a SAFEModel on the audio and VQA validation sets."""

    def __init__(self, model, audio_val, vqa_val, distractor_pool, config, run_dir: Path | None,
                 device: torch.device, base_cache: BasePredictionCache | None = None, info: DistInfo = DistInfo()):
        self.model = model
        self.info = info
        self.feature_cache = None  # set by the trainer when the feature cache is on
        self.audio_val = audio_val
        self.vqa_val = vqa_val
        if vqa_val is not None:  # images preprocessed in the loader workers, not in the evaluation loop
            vqa_val.image_processor = model.builder.image_processor
        self.distractor_pool = distractor_pool
        self.config = config
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = device
        train = config.train
        self.decoding = {"max_new_tokens": train.generation_max_new_tokens, "num_beams": train.num_beams}
        self.base_cache = base_cache or BasePredictionCache(model, self.decoding)

    def _loader(self, dataset):
        """This rank's shard (every world_size-th item); results are gathered before any metric."""
        if self.info.enabled:
            dataset = Subset(dataset, range(self.info.rank, len(dataset), self.info.world_size))
        return DataLoader(dataset, batch_size=self.config.train.val_batch_size, shuffle=False,
                          collate_fn=collate_samples, num_workers=self.config.data.num_workers)

    def _generate(self, batch, gate: float) -> list[str]:
        return self.model.generate(batch.to(self.device), gate=gate, **self.decoding)

    # ------------------------------------------------------------------------------------- captions

    def _captions(self) -> tuple[dict, dict, dict, int]:
        builder = self.model.builder
        predictions, muted, references, skipped = {}, {}, {}, 0
        for collated in self._loader(self.audio_val):
            skipped += len(collated["skipped"])
            if not collated["size"]:
                continue
            batch = audio_batch(self.model, collated, self.feature_cache, with_answers=False)
            for key, text in zip(collated["ids"], self._generate(batch, gate=1.0)):
                predictions[str(key)] = text
            for key, refs in zip(collated["ids"], collated["references"]):
                references[str(key)] = refs
        predictions, references = gather_dict(predictions, self.info), gather_dict(references, self.info)
        skipped = sum(gather_dict({self.info.rank: skipped}, self.info).values())

        def compute_muted():
            # The audio path off: the base answers the caption prompt with no audio, so only the clip ids are
            # needed (no second decode of the clips). This rank's share of the ids, gathered.
            mine = sorted(predictions)[self.info.rank :: self.info.world_size]
            size, out = self.config.train.val_batch_size, {}
            for start in range(0, len(mine), size):
                chunk = mine[start : start + size]
                batch = builder.caption_batch(None, batch_size=len(chunk), ids=chunk)
                out.update(zip(chunk, self._generate(batch, gate=0.0)))
            return gather_dict(out, self.info)

        muted = self.base_cache.get_or_compute("captions", self.audio_val.manifest_path, sorted(predictions),
                                               compute_muted, self.info)
        return predictions, {k: muted[k] for k in predictions}, references, skipped

    # ------------------------------------------------------------------------------------------ VQA

    def distractor_audio(self, ids: list, salt: int = 0) -> torch.Tensor:
        """Encoder features of one training clip per question, drawn from (seed, question id) so every
        evaluation uses the same distractors."""
        clips = []
        for qid in ids:
            digest = int(hashlib.sha256(f"{self.config.train.seed}:{salt}:{qid}".encode()).hexdigest()[:15], 16)
            rng = np.random.default_rng(digest)
            for _ in range(16):  # a bad clip is skipped, another drawn
                item = self.distractor_pool[int(rng.integers(len(self.distractor_pool)))]
                if item["kind"] == "audio":
                    clips.append(item)
                    break
            else:
                raise RuntimeError("could not load any distractor clip from the training audio")
        return batch_features(collate_samples(clips), self.model, self.feature_cache)

    def _vqa(self) -> tuple[dict, dict, dict, dict, dict, int]:
        builder = self.model.builder
        safe, distractor, answers, answer_types, skipped = {}, {}, {}, {}, 0
        for collated in self._loader(self.vqa_val):
            skipped += len(collated["skipped"])
            if not collated["size"]:
                continue
            ids = [str(i) for i in collated["ids"]]
            batch = builder.from_collated(collated, with_answers=False)
            safe.update(zip(ids, self._generate(batch, gate=1.0)))
            with_audio = batch.with_audio(audio_features=self.distractor_audio(collated["ids"]))
            distractor.update(zip(ids, self._generate(with_audio, gate=1.0)))
            answers.update(zip(ids, collated["answers"]))
            answer_types.update(zip(ids, collated["answer_types"]))
        safe, distractor = gather_dict(safe, self.info), gather_dict(distractor, self.info)
        answers, answer_types = gather_dict(answers, self.info), gather_dict(answer_types, self.info)
        skipped = sum(gather_dict({self.info.rank: skipped}, self.info).values())

        def compute_base():
            out = {}
            for collated in self._loader(self.vqa_val):
                if collated["size"]:
                    batch = builder.from_collated(collated, with_answers=False)
                    out.update(zip(map(str, collated["ids"]), self._generate(batch, gate=0.0)))
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
        if not collated["size"]:
            return False
        batch = model.builder.from_collated(collated, with_answers=True).to(self.device)
        bare = model.base(**model.base_inputs(batch)).logits
        features = self.distractor_audio(collated["ids"], salt=1)
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
            predictions, muted, references, audio_skipped = self._captions()
            base, safe, distractor, answers, answer_types, vl_skipped = self._vqa()
            exact = all_true(self.gate0_exact(), self.info)
        finally:
            self.model.train(was_training)
        # Scores are means over items: a fixed item order makes them bit-identical however the predictions were
        # gathered (one process, or shards from several ranks).
        predictions, muted, references, base, safe, distractor, answers = (
            dict(sorted(d.items())) for d in (predictions, muted, references, base, safe, distractor, answers))
        captions = caption_metrics(predictions, references)
        muted_cider = caption_metrics(muted, references, cider_only=True)["cider"]
        base_acc = vqa_score(base, answers)["accuracy"]
        safe_acc = vqa_score(safe, answers)["accuracy"]
        distractor_acc = vqa_score(distractor, answers)["accuracy"]
        metrics = {f"audio_{k}": v for k, v in captions.items() if k not in ("n", "note")}
        metrics.update(
            audio_cider_muted=muted_cider,
            audio_gain=captions["cider"] - muted_cider,
            audio_samples=len(predictions),
            audio_metrics_note=captions["note"],
            vl_base_accuracy=base_acc,
            vl_safe_accuracy=safe_acc,
            vl_safe_distractor_accuracy=distractor_acc,
            vl_delta=safe_acc - base_acc,
            vl_distractor_delta=distractor_acc - base_acc,
            vl_samples=len(safe),
            gate0_exact=exact,
            eval_skipped_samples=audio_skipped + vl_skipped,
            eval_seconds=round(time.perf_counter() - started, 3),
            step=step,
        )
        if self.run_dir is not None and self.info.is_main:
            self._write_predictions(step, predictions, muted, references, base, safe, distractor, answers,
                                    answer_types)
        return metrics

    def _write_predictions(self, step, predictions, muted, references, base, safe, distractor, answers,
                           answer_types) -> None:
        folder = self.run_dir / "predictions" / f"step_{step:08d}"
        write_jsonl(folder / "captions.jsonl",
                    ({"id": k, "prediction": predictions[k], "muted": muted[k], "references": references[k]}
                     for k in predictions))
        write_jsonl(folder / "vqa.jsonl",
                    ({"question_id": k, "base": base[k], "safe": safe[k], "safe_distractor": distractor[k],
                      "answers": answers[k], "answer_type": answer_types[k]} for k in safe))
