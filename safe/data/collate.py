"""Collated batches: what the DataLoader hands the training loop and the evaluator for a list of dataset items.

`collate_samples` drops the items that could not be read (each a `{"kind": "bad", ...}` record) and lists them in
`skipped`, so their count survives DataLoader worker processes; the rest become one `AudioItems` or `VQAItems`. A
batch whose items were all bad is an `Items` with nothing but `skipped`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Items:
    """The fields every collated batch has: the good items' ids, in order, and the bad items' records."""

    ids: list = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass
class AudioItems(Items):
    """Captioned clips. Each comes decoded (`audio`, the rows at `audio_index`) or, from the feature cache, already
    encoded (`features`, the rows at `feature_index`); the other fields have one entry per item."""

    audio: torch.Tensor | None = None            # [n decoded, samples] waveforms at the encoder's rate
    audio_index: list[int] = field(default_factory=list)
    features: torch.Tensor | None = None         # [n cached, steps, width] frozen-encoder output
    feature_index: list[int] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    references: list[list[str]] = field(default_factory=list)
    audio_paths: list[str] = field(default_factory=list)


@dataclass
class VQAItems(Items):
    """VQA questions with their images: preprocessed `pixel_values` when the dataset has the model's image
    processor, else the decoded `images`."""

    pixel_values: torch.Tensor | None = None     # [B, 3, h, w]
    images: list | None = None
    questions: list[str] = field(default_factory=list)
    image_paths: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    multiple_choice_answers: list[str] = field(default_factory=list)
    answer_types: list[str | None] = field(default_factory=list)

    def select(self, rows: list[int]) -> "VQAItems":
        """The questions at ``rows`` (in that order) as a batch of their own, with nothing skipped."""
        def pick(value):
            if value is None:
                return None
            return value[rows] if isinstance(value, torch.Tensor) else [value[i] for i in rows]

        return dataclasses.replace(self, **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if f.name != "skipped"}, skipped=[])

    def row(self, index: int) -> "VQAItems":
        """Question ``index`` alone, as a batch of one."""
        return self.select([index])


def collate_samples(items: list[dict]) -> Items:
    """Batch homogeneous samples; bad records are dropped and listed under `skipped`."""
    good = [item for item in items if item["kind"] != "bad"]
    skipped = [item for item in items if item["kind"] == "bad"]
    kinds = {item["kind"] for item in good}
    if len(kinds) > 1:
        raise ValueError(f"a batch must be homogeneous, got kinds {sorted(kinds)}")
    ids = [item["id"] for item in good]
    kind = kinds.pop() if kinds else None
    if kind == "audio":
        audio_index = [i for i, item in enumerate(good) if "audio" in item]
        feature_index = [i for i, item in enumerate(good) if "features" in item]
        return AudioItems(
            ids, skipped,
            audio=torch.from_numpy(np.stack([good[i]["audio"] for i in audio_index])) if audio_index else None,
            audio_index=audio_index,
            features=torch.stack([good[i]["features"] for i in feature_index]) if feature_index else None,
            feature_index=feature_index,
            windows=[item["window"] for item in good], captions=[item["caption"] for item in good],
            references=[item["references"] for item in good], audio_paths=[item["audio_path"] for item in good])
    if kind == "vl":
        processed = all("pixel_values" in item for item in good)
        return VQAItems(
            ids, skipped,
            pixel_values=torch.stack([item["pixel_values"] for item in good]) if processed else None,
            images=None if processed else [item.get("image") for item in good],
            questions=[item["question"] for item in good], image_paths=[item["image_path"] for item in good],
            answers=[item["answers"] for item in good],
            multiple_choice_answers=[item["multiple_choice_answer"] for item in good],
            answer_types=[item["answer_type"] for item in good])
    if kind is not None:
        raise ValueError(f"unknown sample kind {kind!r}")
    return Items(ids, skipped)
