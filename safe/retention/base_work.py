"""The frozen base's work on the VQA training questions, done once per base and shared by every variant and run.

KL retention needs, for each VL training question, the base's own greedy answer (the target it is teacher-forced on)
and the teacher's distribution at the answer positions (gate 0, no audio). Both are a pure function of the frozen
base, the question and its image, so they are cached on disk (safe.data.shard_store), filled lazily during training
and ahead of a sweep by `safe cache-base`. With an entry present, a KL step runs only the student.

Keyed like the evaluation's base predictions (safe.training.evaluator.BasePredictionCache): the base's fingerprint, the
prompt style, the image preprocessing, decoding, dtype, device type, the VL micro-batch size (padding and batch mates
can move a greedy answer near a tie) and the torch/transformers versions; not the world size: a training question's
batch mates come from the run's order, whatever the world size, so they match no other run's anyway. Each entry is
keyed by the question id, its text and its image's content identity (safe.data.file_identity: re-staging the data
keeps the cache).

What is stored per question: the answer text, its label ids (a batch whose labels differ is not served) and either
the teacher's answer-position logits exactly (their own dtype: bf16 on GPU, fp32 on CPU, so a warm KL equals the
uncached one; V values a position), or with ``top_k`` = K > 0 the K largest logits, their token ids, the log-partition
at temperature T and the (K+1)-th log-probability. The top-k KL keeps the tail mass r as one bucket:
    KL_k = T² · [Σ_{i∈S} p_i log(p_i/q_i) + r log(r/Q)],   r = 1 − Σ_S p_i,  Q = 1 − Σ_S q_i,
a lower bound of the exact KL (merging outcomes never raises a KL), off by at most
    T² · r · log(p_(K+1) · Q / (r · min_{i∉S} q_i))
(every tail p_i ≤ p_(K+1) and every tail q_i ≥ their minimum), computed each step and reported.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from safe.core.cache import cache_dir
from safe.core.files import atomic_write_text
from safe.data.collate import VQAItems
from safe.data.file_identity import FileIdentity, FileKeyedStore
from safe.data.shard_store import SHARD_BYTES, ShardStore
from safe.models.prompts import IGNORE_INDEX

FORMAT = "safe-base-work-1"
# Questions of recent batches whose entries a KL step asks for right after `answers` (an exact 7B entry is ~256 KB, so
# a few batches' worth, not an epoch's).
REMEMBERED = 256


def base_work_key(model, max_new_tokens: int, batch_size: int, top_k: int, temperature: float) -> dict:
    """Everything the cached answers and teacher logits depend on besides the question and its image."""
    import transformers

    from safe.models.safe_model import base_fingerprint

    builder = model.builder
    return {"format": FORMAT, "base": model.base_name, "fingerprint": base_fingerprint(model.base),
            "prompts": builder.style.to_dict(), "images": type(builder.image_processor).__name__,
            "pad_to_square": bool(getattr(builder.image_processor, "do_pad", False)),
            "decoding": {"max_new_tokens": max_new_tokens, "num_beams": 1},
            "numerics": {"dtype": str(next(model.base.parameters()).dtype), "device": model.device.type,
                         "batch_size": batch_size, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "teacher": {"top_k": top_k, "temperature": temperature} if top_k else {"exact": True}}


def label_rows(batch) -> list[torch.Tensor]:
    """Each row's answer label ids (the positions answer_logits() returns, in order)."""
    labels = batch.labels[:, 1:]
    return [row[row != IGNORE_INDEX].cpu() for row in labels]


class BaseWorkCache:
    def __init__(self, model, max_new_tokens: int, batch_size: int, data_root: str | Path | None = None,
                 directory: str | Path | None = None, top_k: int = 0, temperature: float = 2.0,
                 shard_bytes: int = SHARD_BYTES, log=None):
        self.model, self.max_new_tokens, self.top_k, self.temperature = model, max_new_tokens, top_k, temperature
        key = base_work_key(model, max_new_tokens, batch_size, top_k, temperature)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.root = Path(directory or cache_dir("base_work")) / digest
        self.store = ShardStore(self.root, shard_bytes=shard_bytes, label="base-work cache")
        self.entries = FileKeyedStore(self.store, FileIdentity(data_root))
        self._key = key
        self._questions: OrderedDict[str, tuple[str, dict, dict | None]] = OrderedDict()
        self.log = log or (lambda record: None)
        self.stats = {"hits": 0, "misses": 0, "stored": 0, "topk_kl_error_bound_max": 0.0}

    @classmethod
    def for_run(cls, model, config, log=None) -> "BaseWorkCache | None":
        """The run's cache (None when --no-base-work-cache or without KL)."""
        settings = config.retention
        if not settings.base_work_cache or settings.kl_weight <= 0:
            return None
        return cls(model, config.train.generation_max_new_tokens, config.train.train_batch_size,
                   config.data.data_root, settings.base_work_cache_dir, settings.teacher_top_k,
                   settings.kl_temperature, log=log)

    # ------------------------------------------------------------------------------------------ entries

    @staticmethod
    def _extra(collated: VQAItems, row: int) -> dict:
        return {"question_id": str(collated.ids[row]), "question": collated.questions[row]}

    def _entry(self, image_path: str, extra: dict) -> dict | None:
        blob = self.entries.get(image_path, extra)
        if blob is None:
            return None
        try:
            tensors = load_bytes(blob)
            header_len = int.from_bytes(blob[:8], "little")  # safetensors: header length, JSON header, values
            meta = json.loads(blob[8:8 + header_len]).get("__metadata__", {})
            return {**tensors, "answer": json.loads(meta["answer"])}
        except Exception:
            self.store.report(f"an entry for question {extra['question_id']} cannot be decoded; it will be recomputed")
            return None

    def _remember(self, qid: str, image_path: str, extra: dict, entry: dict | None) -> None:
        self._questions[qid] = (image_path, extra, entry)
        self._questions.move_to_end(qid)
        while len(self._questions) > REMEMBERED:
            self._questions.popitem(last=False)

    def answers(self, collated: VQAItems) -> dict[str, str]:
        """Cached greedy answers of a collated VQA batch's questions, by question id (missing ones are absent)."""
        found: dict[str, str] = {}
        for row, qid in enumerate(map(str, collated.ids)):
            extra = self._extra(collated, row)
            entry = self._entry(collated.image_paths[row], extra)
            self._remember(qid, collated.image_paths[row], extra, entry)
            if entry is not None:
                found[qid] = entry["answer"]
        return found

    def contains(self, image_path: str, question_id, question: str) -> bool:
        return self.entries.contains(image_path, {"question_id": str(question_id), "question": question})

    # ------------------------------------------------------------------------------------------ teacher

    def teacher(self, batch):
        """The cached teacher of a labelled VL batch (every row's question seen by `answers` and cached with these
        very labels): a float32 [N, V] tensor of answer-position logits, or a TopKTeacher. None: not all cached."""
        rows = label_rows(batch)
        entries = []
        for qid, labels in zip(map(str, batch.ids), rows):
            remembered = self._questions.get(qid)
            entry = remembered[2] if remembered else None
            if entry is None or not torch.equal(entry["answer_ids"], labels.to(entry["answer_ids"].dtype)):
                self.stats["misses"] += 1
                return None
            entries.append(entry)
        self.stats["hits"] += 1
        device = self.model.device
        if not self.top_k:
            return torch.cat([e["teacher"] for e in entries]).to(device).float()
        return TopKTeacher({k: torch.cat([e[k] for e in entries]).to(device) for k in ("values", "indices", "lse",
                                                                                         "next")}, self)

    def put(self, batch, logits: torch.Tensor, answers: list[str]) -> None:
        """Store each row's answer and teacher logits (``logits``: answer_logits() of the gate-0 base, its dtype)."""
        start = 0
        for qid, labels, answer in zip(map(str, batch.ids), label_rows(batch), answers):
            rows = logits[start:start + len(labels)].detach().to("cpu")
            start += len(labels)
            remembered = self._questions.get(qid)
            if remembered is None:
                continue  # a question not seen through answers(): its image is unknown here
            tensors = {"answer_ids": labels.to(torch.int64).contiguous(), **self._teacher_tensors(rows)}
            blob = save_bytes(tensors, metadata={"format": FORMAT, "answer": json.dumps(answer)})
            self.entries.put(remembered[0], remembered[1], blob)
            self._remember(qid, remembered[0], remembered[1], {**tensors, "answer": answer})
            self.stats["stored"] += 1

    def _teacher_tensors(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.top_k:
            return {"teacher": logits.clone(memory_format=torch.contiguous_format)}
        scaled = logits.float() / self.temperature
        k = min(self.top_k, logits.shape[-1])
        top = scaled.topk(min(k + 1, logits.shape[-1]), dim=-1)
        lse = torch.logsumexp(scaled, dim=-1)
        following = top.values[:, k] - lse if k < logits.shape[-1] else torch.full_like(lse, float("-inf"))
        indices = top.indices[:, :k]
        return {"values": logits.gather(-1, indices).contiguous(), "indices": indices.to(torch.int32).contiguous(),
                "lse": lse.contiguous(), "next": following.contiguous()}

    # --------------------------------------------------------------------------------------- filling

    @torch.no_grad()
    def fill(self, collated: VQAItems) -> int:
        """Compute and store the entries of a collated batch's uncached questions (`safe cache-base`); returns how
        many were computed. The same calls as the training path: greedy answers at gate 0, then the teacher."""
        known = self.answers(collated)
        missing = [i for i, qid in enumerate(map(str, collated.ids)) if qid not in known]
        if not missing:
            return 0
        model, chosen = self.model, collated.select(missing)
        prompt = model.builder.vqa_batch(chosen.images, chosen.questions,
                                         pixel_values=chosen.pixel_values).to(model.device)
        answers = model.generate(prompt, gate=0.0, max_new_tokens=self.max_new_tokens)
        batch = model.builder.vqa_batch(chosen.images, chosen.questions, answers, pixel_values=chosen.pixel_values,
                                        ids=chosen.ids).to(model.device)
        self.put(batch, model(batch, gate=0.0).answer_logits(), answers)
        return len(missing)

    def flush(self) -> None:
        self.store.flush()
        if not (self.root / "key.json").exists() and self.store.files():
            atomic_write_text(self.root / "key.json", json.dumps(self._key, indent=1, sort_keys=True), fsync=False)

    def note_bound(self, bound: float) -> None:
        self.stats["topk_kl_error_bound_max"] = max(self.stats["topk_kl_error_bound_max"], bound)
        if (self.stats["hits"] % 100) == 1:
            self.log({"event": "base_work_cache", **self.stats, "topk_kl_error_bound": bound})


class TopKTeacher:
    """A cached top-k teacher for one batch; `kl(student, T)` is the bucketed KL (see the module's note)."""

    def __init__(self, tensors: dict, cache: BaseWorkCache | None = None):
        self.tensors, self.cache = tensors, cache
        self.bound: float | None = None

    def kl(self, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
        t = self.tensors
        indices = t["indices"].long()
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        log_p_top = t["values"].float() / temperature - t["lse"][:, None]
        p_top = log_p_top.exp()
        log_q_top = log_q.gather(-1, indices)
        tail_p = (1 - p_top.sum(-1)).clamp(min=0)
        tail_q = (1 - log_q_top.exp().sum(-1)).clamp(min=1e-30)
        head = (p_top * (log_p_top - log_q_top)).sum(-1)
        log_r = tail_p.clamp(min=1e-30).log()
        tail = torch.where(tail_p > 0, tail_p * (log_r - tail_q.log()), torch.zeros_like(tail_p))
        per_position = head + tail
        with torch.no_grad():
            outside = log_q.scatter(-1, indices, float("inf")).amin(-1)   # log of the smallest tail q_i
            gap = t["next"] + tail_q.log() - log_r - outside
            bound = torch.where(tail_p > 0, tail_p * gap.clamp(min=0), torch.zeros_like(tail_p))
            self.bound = bound_value = float(temperature**2 * bound.mean())
        if self.cache is not None:
            self.cache.note_bound(bound_value)
        return temperature**2 * per_position.mean()
