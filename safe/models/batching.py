"""Model batches: prompts (+ answers) as left-padded token ids, images as pixel values, audio as waveforms.

Every batch is left-padded, for training and generation alike, with position ids counted from the
first real token; so a sample's logits do not depend on how much padding its batch needed, and the
teacher-forced and generated paths agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from safe.data.collate import AudioItems, Items, VQAItems
from safe.models.prompts import IGNORE_INDEX, TINY, PromptStyle, encode_examples, expand_image_token


@dataclass
class SafeBatch:
    kind: str                                   # "audio" (captioning) or "vl" (VQA)
    input_ids: torch.Tensor                     # [B, L] left-padded
    attention_mask: torch.Tensor                # [B, L]
    splice_pos: torch.Tensor                    # [B] index after "USER:" in the padded row (prefix fusion)
    labels: torch.Tensor | None = None          # [B, L], IGNORE_INDEX except answer + eos; None for generation
    pixel_values: torch.Tensor | None = None    # [B, 3, h, w] (VL batches)
    audio: torch.Tensor | None = None           # [B, S] waveforms at the encoder's rate
    audio_features: torch.Tensor | None = None  # [B, T, D] frozen encoder output (e.g. from a feature cache)
    ids: list | None = None

    @property
    def has_audio(self) -> bool:
        return self.audio is not None or self.audio_features is not None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)

    def with_audio(self, audio: torch.Tensor | None = None, audio_features: torch.Tensor | None = None) -> "SafeBatch":
        """The same batch with other (or no) audio attached, e.g. a distractor clip for a VL batch."""
        return dataclasses.replace(self, audio=audio, audio_features=audio_features)

    def map_tensors(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> "SafeBatch":
        """The same batch with ``fn(field name, tensor)`` applied to every tensor field (absent ones stay None)."""
        changed: dict[str, Any] = {f.name: fn(f.name, value) for f in dataclasses.fields(self)
                                   if isinstance(value := getattr(self, f.name), torch.Tensor)}
        return dataclasses.replace(self, **changed)

    def to(self, device, dtype: torch.dtype | None = None) -> "SafeBatch":
        """Move tensors; ``dtype`` applies to pixel values only (ids, masks and audio keep theirs)."""
        return self.map_tensors(lambda name, t: t.to(device, dtype) if name == "pixel_values" and dtype is not None
                                else t.to(device))


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... from each row's first real token (what generate() computes for left padding)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class BatchBuilder:
    """Turns prompts, answers, images and audio into a ``SafeBatch`` for one tokenizer/processor."""

    MEMO_BYTES = 64 << 20  # tokenised examples kept, in bytes of keys and ids (a LLaVA VQA prompt is ~10 KB)

    def __init__(self, tokenizer, image_processor=None, num_image_tokens: int = 0, style: PromptStyle = TINY):
        self.tokenizer, self.image_processor, self.num_image_tokens = tokenizer, image_processor, num_image_tokens
        self.style = style
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Training sees each (prompt, answer) once an epoch: later epochs reuse its ids instead of tokenising again.
        self._memo: dict[tuple, tuple[np.ndarray, np.ndarray, int]] = {}
        self._memo_bytes = 0

    def _examples(self, prompts: list[str], answers: list[str] | None) -> list[tuple[np.ndarray, np.ndarray, int]]:
        keys = [(p, None if answers is None else answers[i]) for i, p in enumerate(prompts)]
        missing = list(dict.fromkeys(k for k in keys if k not in self._memo))
        fresh = {}
        if missing:
            encoded = encode_examples(self.tokenizer, [p for p, _ in missing],
                                      None if answers is None else [cast(str, a) for _, a in missing],
                                      splice_prefix=self.style.splice_prefix())
            for key, example in zip(missing, encoded):
                fresh[key] = (np.asarray(example.input_ids, dtype=np.int32),
                              np.asarray(example.labels, dtype=np.int32), example.splice_pos)
                size = len(key[0]) + len(key[1] or "") + fresh[key][0].nbytes + fresh[key][1].nbytes
                if self._memo_bytes + size <= self.MEMO_BYTES:
                    self._memo[key] = fresh[key]
                    self._memo_bytes += size
        return [fresh[k] if k in fresh else self._memo[k] for k in keys]

    def warm(self, prompts: list[str], answers: list[str] | None = None, chunk: int = 4096) -> int:
        """Tokenise examples ahead of time (batched) until the memo is full; returns how many are memoised."""
        for start in range(0, len(prompts), chunk):
            if self._memo_bytes >= self.MEMO_BYTES * 0.99:
                break
            self._examples(prompts[start:start + chunk], None if answers is None else answers[start:start + chunk])
        return len(self._memo)

    def caption_prompt(self, question: str | None = None) -> str:
        return self.style.caption(question)

    def vqa_prompt(self, question: str) -> str:
        """The VQA prompt with ``<image>`` expanded to the vision tower's token count."""
        return expand_image_token(self.style.vqa(question), self.num_image_tokens)

    def encode(self, kind: str, prompts: list[str], answers: list[str] | None = None, **extra) -> SafeBatch:
        if answers is not None and len(answers) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        examples = self._examples(prompts, answers)
        width = max(len(ids) for ids, _, _ in examples)
        ids = np.full((len(examples), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(examples), width), dtype=np.int64)
        labels = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
        splice = np.zeros(len(examples), dtype=np.int64)
        for row, (example_ids, example_labels, splice_pos) in enumerate(examples):
            pad = width - len(example_ids)
            ids[row, pad:] = example_ids
            mask[row, pad:] = 1
            labels[row, pad:] = example_labels
            splice[row] = pad + splice_pos
        return SafeBatch(kind=kind, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         splice_pos=torch.from_numpy(splice),
                         labels=torch.from_numpy(labels) if answers is not None else None, **extra)

    def caption_batch(self, audio: torch.Tensor | None, captions: list[str] | None = None,
                      question: str | None = None, batch_size: int | None = None, ids=None) -> SafeBatch:
        """Audio captioning; ``captions`` given -> training batch, else a generation batch."""
        n = audio.shape[0] if audio is not None else (len(captions) if captions is not None else batch_size)
        if n is None:
            raise ValueError("caption_batch needs audio, captions or batch_size")
        return self.encode("audio", [self.caption_prompt(question)] * n, captions, audio=audio, ids=ids)

    def vqa_batch(self, images, questions: list[str], answers: list[str] | None = None,
                  audio: torch.Tensor | None = None, ids=None, pixel_values: torch.Tensor | None = None) -> SafeBatch:
        """VQA with one image per question; ``answers`` given -> training batch (one answer string each).
        ``pixel_values`` already preprocessed (e.g. by loader workers) replace ``images``."""
        count = len(pixel_values) if pixel_values is not None else len(images)
        if count != len(questions):
            raise ValueError(f"{count} images but {len(questions)} questions")
        if pixel_values is None:
            pixel_values = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        prompts = [self.vqa_prompt(q) for q in questions]
        return self.encode("vl", prompts, answers, pixel_values=pixel_values, audio=audio, ids=ids)

    def from_collated(self, collated: Items, with_answers: bool = True, audio: torch.Tensor | None = None,
                      question: str | None = None) -> SafeBatch:
        """From ``safe.data.collate.collate_samples`` output. Audio batches train on their caption,
        VL batches on the majority (multiple-choice) answer; ``audio`` attaches e.g. distractor clips to VL."""
        if isinstance(collated, AudioItems):
            return self.caption_batch(collated.audio, collated.captions if with_answers else None,
                                      question=question, ids=collated.ids)
        if isinstance(collated, VQAItems):
            answers = collated.multiple_choice_answers if with_answers else None
            return self.vqa_batch(collated.images, collated.questions, answers, audio=audio,
                                  ids=collated.ids, pixel_values=collated.pixel_values)
        raise ValueError(f"cannot build a model batch from an empty {type(collated).__name__}")
