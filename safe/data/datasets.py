"""Map-style datasets over the JSONL manifests (README, "Data layout").

Rows are held as a small index (dicts); media are decoded on access. A sample whose media cannot be read is
returned as a `{"kind": "bad", ...}` record (or raises, with on_bad_sample="error"); the collate
(safe/data/collate.py) drops it and lists it in the batch's `skipped`, so the count survives DataLoader workers.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from safe.core.errors import SafeError
from safe.data.audio import AudioLoadError, audio_info, choose_window, load_audio
from safe.data.images import ImageLoadError, load_image
from safe.data.leakage import wavcaps_row_is_banned
from safe.data.manifest import ManifestError, RowChecker, find_split, iter_jsonl, resolve_media_path
from safe.data.subsets import spread_subset

BAD_SAMPLE_POLICIES = ("skip", "error")


class BadSampleError(SafeError):
    """A sample could not be loaded and the policy is on_bad_sample='error'."""


def _check_policy(policy: str) -> None:
    if policy not in BAD_SAMPLE_POLICIES:
        raise SafeError(f"on_bad_sample must be one of {', '.join(BAD_SAMPLE_POLICIES)}, not {policy!r}.")


class _ManifestDataset(Dataset):
    """Shared plumbing: manifest discovery, row checks, path resolution, bad-sample policy."""

    dataset_name = ""
    row_kind = ""

    def __init__(
        self,
        data_root: str | Path,
        split: str,
        on_bad_sample: str = "skip",
        max_samples: int | None = None,
        allow_outside_paths: bool = False,
        subset_seed: int = 0,
    ):
        _check_policy(on_bad_sample)
        self.data_root = Path(data_root)
        self.split = split
        self.on_bad_sample = on_bad_sample
        self.allow_outside_paths = allow_outside_paths
        self.manifest_path = find_split(self.data_root, self.dataset_name, split)
        rows = []
        check = RowChecker(self.row_kind, split, self.manifest_path)
        for number, row in iter_jsonl(self.manifest_path):
            where = f"{self.manifest_path}:{number}"
            check(number, row)
            row["_where"] = where
            rows.append(row)
        rows = self._build_items(rows)
        self.split_size = len(rows)  # before any subset: metrics say "n of the split's N"
        if max_samples is not None and len(rows) > max_samples:
            # A seeded random subset spread over images/clips, never the first N (files are grouped by image).
            rows = [rows[i] for i in spread_subset([self.subset_group(row) for row in rows], max_samples, subset_seed)]
        if not rows:
            raise ManifestError(f"{self.manifest_path} has no rows: the {self.dataset_name} {split} split is empty.")
        self.items = rows

    def _build_items(self, rows: list[dict]) -> list[dict]:
        return rows

    def subset_group(self, row: dict):
        """Items of one group (e.g. the questions about one image) are the last to share a subset."""
        return id(row)

    def resolve(self, row: dict, key: str) -> Path:
        try:
            return resolve_media_path(row[key], self.manifest_path, self.data_root, self.allow_outside_paths)
        except ManifestError as exc:
            raise ManifestError(f"{row['_where']}: {exc}") from None

    def __len__(self) -> int:
        return len(self.items)

    def _bad(self, item_id, path: Path, exc: Exception) -> dict:
        if self.on_bad_sample == "error":
            raise BadSampleError(f"sample {item_id} ({path}): {exc}") from None
        return {"kind": "bad", "id": item_id, "path": str(path), "reason": str(exc)}


class _AudioDataset(_ManifestDataset):
    """Audio-caption rows; training crops a random window drawn from (seed, epoch, index)."""

    def __init__(
        self,
        data_root: str | Path,
        split: str = "train",
        sample_rate: int = 16000,
        clip_seconds: float = 10.0,
        training: bool | None = None,
        seed: int = 0,
        **kwargs,
    ):
        self.sample_rate = sample_rate
        self.clip_seconds = clip_seconds
        self.training = split == "train" if training is None else training
        self.seed = seed
        self.feature_cache = None  # a FeatureCache, set once the encoder is known
        super().__init__(data_root, split, **kwargs)
        # Resolve every path up front so an escaping or absolute path fails at start, not mid-epoch.
        for item in self.items:
            item["path"] = self.resolve(item, "audio_path")

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        # The training stream passes (epoch, index): persistent loader workers hold their own copy of the dataset,
        # so the epoch travels with the index. A plain index is epoch 0.
        epoch, index = index if isinstance(index, tuple) else (0, index)
        item = self.items[index]
        rng = np.random.default_rng([self.seed, epoch, index]) if self.training else None
        sample = {"kind": "audio", "id": item["id"], "caption": item["references"][0],
                  "references": list(item["references"]), "audio_path": str(item["path"])}
        try:
            window = choose_window(audio_info(item["path"]), self.clip_seconds, self.training, rng)
            sample["window"] = window
            if self.feature_cache is not None:
                features = self.feature_cache.get(item["path"], window)
                if features is not None:  # the frozen encoder's output: no decode needed
                    return {**sample, "features": features}
            audio = load_audio(item["path"], self.sample_rate, self.clip_seconds, window_index=window)
        except AudioLoadError as exc:
            return self._bad(item["id"], item["path"], exc)
        return {**sample, "audio": audio}


class AudioCapsDataset(_AudioDataset):
    """AudioCaps: train has one caption per row; val/test yield one item per clip with all its references."""

    dataset_name = "audiocaps"
    row_kind = "audiocaps"

    def _build_items(self, rows: list[dict]) -> list[dict]:
        if self.training:
            items: list[dict] = []
            for row in rows:
                captions = [row["caption"]] if "caption" in row else list(row["captions"])
                items.extend({**row, "references": [caption]} for caption in captions)
            return items
        # Evaluation: group one-caption-per-row files by clip, keeping first-seen order.
        groups: OrderedDict = OrderedDict()
        for row in rows:
            key = (row.get("youtube_id", row["audio_path"]), row.get("start_time"))
            captions = list(row["captions"]) if "captions" in row else [row["caption"]]
            if key in groups:
                groups[key]["references"].extend(captions)
            else:
                groups[key] = {**row, "references": captions}
        return list(groups.values())


class ClothoDataset(AudioCapsDataset):
    """Clotho, prepared by `safe data prepare clotho`: rows shaped like AudioCaps ones (train one caption a row,
    val/test the 5 references of a clip). Its 15-30 s clips are longer than most encoders' window, so evaluation
    hears the first window and training a random one, as for any long clip."""

    dataset_name = "clotho"
    row_kind = "clotho"


class WavCapsDataset(_AudioDataset):
    """WavCaps training rows; `ratio` keeps a fixed, seeded fraction of them (what --wavcaps-ratio means)."""

    dataset_name = "wavcaps"
    row_kind = "wavcaps"

    def __init__(self, data_root: str | Path, split: str = "train", ratio: float = 1.0,
                 banned: set[str] | None = None, **kwargs):
        if not 0.0 < ratio <= 1.0:
            raise SafeError(f"--wavcaps-ratio must be in (0, 1], not {ratio}.")
        self.ratio = ratio
        self.banned = banned or set()  # id forms of AudioCaps val/test clips and blacklisted clips (leakage)
        self.dropped_overlap: list[str] = []
        super().__init__(data_root, split, **kwargs)

    def _build_items(self, rows: list[dict]) -> list[dict]:
        kept = []
        for row in rows:
            if self.banned and wavcaps_row_is_banned(row, self.banned):
                self.dropped_overlap.append(row["_where"])   # an evaluation clip: never trained on
            else:
                kept.append(row)
        rows = kept
        for row in rows:
            row["references"] = [row["caption"]]
        if self.ratio >= 1.0:
            return rows
        keep = max(1, int(round(self.ratio * len(rows))))
        chosen = np.random.default_rng(self.seed).permutation(len(rows))[:keep]
        return [rows[i] for i in sorted(chosen)]


class VQADataset(_ManifestDataset):
    """VQA v2 rows: image, question and the 10 human answers."""

    dataset_name = "vqa"
    row_kind = "vqa"

    def subset_group(self, row: dict):
        return row["image_path"]

    def __init__(self, data_root: str | Path, split: str = "train", **kwargs):
        super().__init__(data_root, split, **kwargs)
        for item in self.items:
            item["path"] = self.resolve(item, "image_path")
        # The model's image processor, set once the model is known: images are then preprocessed here, in the
        # DataLoader workers, instead of in the training loop (CLIP preprocessing at 336 px is several ms an image).
        self.image_processor = None

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        item = self.items[index[1] if isinstance(index, tuple) else index]  # (epoch, index): the epoch is unused
        try:
            image = load_image(item["path"])
        except ImageLoadError as exc:
            return self._bad(item["question_id"], item["path"], exc)
        answers = list(item["answers"])
        if self.image_processor is not None:
            pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
            media = {"pixel_values": pixels}
        else:
            media = {"image": image}
        return {
            "kind": "vl",
            "id": item["question_id"],
            **media,
            "question": item["question"],
            "answers": answers,
            "multiple_choice_answer": item.get("multiple_choice_answer", answers[0]),
            "answer_type": item.get("answer_type"),
            "image_path": str(item["path"]),
        }
