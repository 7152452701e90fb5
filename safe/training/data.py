"""Training and evaluation data for a run: datasets checked before any model is loaded, seeded batch order.

Batch order is a pure function of (seed, stream, epoch), so a resumed run replays exactly the batches an
uninterrupted one would have seen, starting from the saved position, without storing sampler state.
"""

from __future__ import annotations

import bisect
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from safe.core.errors import SafeError
from safe.data.collate import Items, collate_samples
from safe.data.datasets import AudioCapsDataset, ClothoDataset, VQADataset, WavCapsDataset
from safe.data.leakage import banned_keys, read_blacklist
from safe.data.manifest import ManifestError
from safe.data.mixing import SourceMix

EVAL_DATASETS = {"audiocaps": AudioCapsDataset, "clotho": ClothoDataset}


@dataclass
class RunData:
    audio_train: Dataset
    audio_val: AudioCapsDataset
    vqa_train: VQADataset | None
    vqa_val: VQADataset
    distractor_pool: AudioCapsDataset      # training clips in evaluation mode (first window): training distractors
    eval_distractors: AudioCapsDataset     # clips never trained on: the distractors of every evaluation
    eval_distractor_source: str            # which clips those are, in words (written to metrics.json)
    wavcaps_dropped_overlap: int = 0       # WavCaps rows dropped as AudioCaps val/test or blacklisted clips
    source_mix: SourceMix | None = None    # the training audio sources and their weights


def load_run_data(config, sample_rate: int, clip_seconds: float) -> RunData:
    """Open every manifest the run needs; any problem is a SafeError before a model is touched."""
    data, seed = config.data, config.train.seed
    from pathlib import Path

    if not Path(data.data_root).is_dir():
        raise SafeError(
            f"Data root {data.data_root} does not exist; stage data with "
            "`python -m experiments.full_training.download_data --audiocaps-url URL --vqa-url URL`, "
            "pass --data-root, or try `make demo` for the toy world."
        )
    common = dict(on_bad_sample=data.on_bad_sample, allow_outside_paths=data.allow_outside_paths)
    audio = dict(sample_rate=sample_rate, clip_seconds=clip_seconds, seed=seed, **common)
    weights = data.source_weights
    heldout = heldout_audiocaps(data.data_root, audio)
    parts: dict[str, AudioCapsDataset | WavCapsDataset] = {}  # ClothoDataset is an AudioCapsDataset
    if weights is None or weights.get("audiocaps", 0) > 0:
        parts["audiocaps"] = AudioCapsDataset(data.data_root, "train", training=True, **audio)
    dropped = 0
    if data.use_wavcaps and (weights is None or weights.get("wavcaps", 0) > 0):
        blacklist = read_blacklist(Path(data.wavcaps_blacklist)) if data.wavcaps_blacklist else None
        banned = banned_keys((item.get("youtube_id") for split in heldout.values() for item in split.items), blacklist)
        wavcaps = WavCapsDataset(data.data_root, "train", ratio=data.wavcaps_ratio, training=True,
                                 banned=banned, **audio)
        parts["wavcaps"] = wavcaps
        dropped = len(wavcaps.dropped_overlap)
    if weights is not None and weights.get("clotho", 0) > 0:
        parts["clotho"] = ClothoDataset(data.data_root, "train", training=True, **audio)
    datasets = list(parts.values())
    audio_train: Dataset = datasets[0] if len(datasets) == 1 else EpochConcatDataset(datasets)
    mix = SourceMix(list(parts), [len(d) for d in datasets],
                    [weights[name] for name in parts] if weights is not None else None)
    audio_val = EVAL_DATASETS[data.audio_eval_dataset](data.data_root, data.audio_eval_split, training=False,
                                                       max_samples=data.max_audio_eval_samples,
                                                       subset_seed=data.eval_seed, **audio)
    vqa_train = VQADataset(data.data_root, "train", **common) if config.retention.use_vl else None
    vqa_val = VQADataset(data.data_root, data.vl_eval_split, max_samples=data.max_vl_eval_samples,
                         subset_seed=data.eval_seed, **common)
    pool = AudioCapsDataset(data.data_root, "train", training=False, **audio)
    distractors, source = eval_distractor_clips(heldout, audio_val)
    return RunData(audio_train, audio_val, vqa_train, vqa_val, pool, distractors, source, dropped, mix)


def heldout_audiocaps(data_root, audio: dict) -> dict[str, AudioCapsDataset]:
    """AudioCaps val and (when staged) test, whole, in evaluation mode: the clips no run trains on."""
    out = {}
    for split in ("val", "test"):
        try:
            out[split] = AudioCapsDataset(data_root, split, training=False, **audio)
        except ManifestError:
            if split == "val":
                raise
    return out


def eval_distractor_clips(heldout: dict[str, AudioCapsDataset], captioned: AudioCapsDataset):
    """Distractor clips for evaluation: AudioCaps val/test clips that are not captioned in this evaluation, so
    retention is measured on audio the model never trained on (and not on the clip it is asked to caption).
    When every held-out clip is captioned (a small toy split), the captioned clips themselves: still unseen."""
    taken = {(item.get("youtube_id"), item.get("start_time"), str(item["path"])) for item in captioned.items}
    pool, names = [], []
    for split, dataset in heldout.items():
        free = [item for item in dataset.items
                if (item.get("youtube_id"), item.get("start_time"), str(item["path"])) not in taken]
        if free:
            pool.extend(free)
            same = captioned.dataset_name == "audiocaps" and split == captioned.split
            names.append(f"audiocaps {split}" + (" (clips not captioned)" if same else ""))
    if not pool:
        return captioned, f"{captioned.dataset_name} {captioned.split} (the captioned clips: no other held-out clips)"
    return heldout_view(captioned, pool), " + ".join(names)


def heldout_view(template: AudioCapsDataset, items: list[dict]) -> AudioCapsDataset:
    """An AudioCaps evaluation dataset over ``items`` (rows already checked and resolved)."""
    view = copy.copy(template)
    view.items = items
    return view


GROUP_SPAN = 1024   # positions whose items are sorted by length together
GROUP_BLOCK = 32    # length-sorted positions that stay together when a span is reshuffled


def length_grouped(order: np.ndarray, lengths: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``order`` rearranged so that neighbouring positions have similar lengths, still randomly ordered overall.

    Each span of GROUP_SPAN positions is sorted by length and cut into blocks of GROUP_BLOCK, and the blocks of a
    span are shuffled. Batches of consecutive positions then hold items of similar length, so a micro-batch pads
    little (caption lengths vary 2-4x). Spans and blocks are fixed sizes, not multiples of the batch, so the order
    stays independent of the world size (see rank_batches)."""
    out = np.empty_like(order)
    for start in range(0, len(order), GROUP_SPAN):
        span = order[start:start + GROUP_SPAN]
        span = span[np.argsort(lengths[span], kind="stable")]
        blocks = [span[i:i + GROUP_BLOCK] for i in range(0, len(span), GROUP_BLOCK)]
        out[start:start + len(span)] = np.concatenate([blocks[i] for i in rng.permutation(len(blocks))])
    return out


def epoch_order(size: int, seed: int, stream: int, epoch: int, lengths: np.ndarray | None = None,
                mix: SourceMix | None = None) -> np.ndarray:
    """The global order of one epoch of one stream: a seeded permutation, or the weighted draw of a source mix,
    optionally length-grouped. It does not depend on the world size."""
    rng = np.random.default_rng([seed, stream, epoch])
    if mix is not None and mix.weights is not None:
        order = mix.epoch_order(seed, stream, epoch)
    else:
        order = rng.permutation(size)
    if lengths is not None:
        order = length_grouped(order, np.asarray(lengths), rng)
    return order


def rank_batches(size: int, batch_size: int, seed: int, stream: int, epoch: int, consumed: int = 0,
                 rank: int = 0, world_size: int = 1, lengths: np.ndarray | None = None,
                 mix: SourceMix | None = None) -> list[list[int]]:
    """This rank's index batches for the rest of one epoch of one stream.

    The epoch's order is a seeded permutation that does not depend on the world size; each global batch of
    batch_size × world_size positions is split into consecutive per-rank slices, and positions past the end
    wrap around (as DistributedSampler pads). `consumed` counts global positions already used, so a run can
    resume mid-epoch with another world size. (DistributedSampler's own order depends on the number of
    replicas, which would make such a resume replay a different data order.) With ``lengths`` (one per item) the
    permutation is length-grouped (`length_grouped`); with a weighted ``mix`` the epoch is the mix's draw.
    """
    order = epoch_order(size, seed, stream, epoch, lengths, mix)
    step = batch_size * world_size
    batches = []
    for start in range(consumed, size, step):
        first = start + rank * batch_size
        batches.append([int(order[i % size]) for i in range(first, first + batch_size)])
    return batches


def _length(dataset: Dataset) -> int:
    return len(dataset)  # type: ignore[arg-type]  # torch's Dataset declares no __len__; map-style ones have it


class BatchStream:
    """An endless, resumable stream of collated batches over a dataset: (epoch, consumed) is its state."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, stream: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, length_grouping: bool = False, mix: SourceMix | None = None):
        self.dataset, self.batch_size, self.seed, self.stream = dataset, batch_size, seed, stream
        self.lengths = np.asarray(item_lengths(dataset)) if length_grouping else None
        self.num_workers, self.rank, self.world_size = num_workers, rank, world_size
        self.mix = mix
        self.epoch, self.consumed = 0, 0
        # Positions drawn per source in finished epochs (global: all ranks), for the realised mix.
        self.drawn = np.zeros(len(mix.names), dtype=np.int64) if mix is not None else None
        self._iterator: Iterator | None = None
        self._loader: DataLoader | None = None

    @property
    def batches_per_epoch(self) -> int:
        return -(-_length(self.dataset) // (self.batch_size * self.world_size))

    def state(self) -> dict:
        state: dict[str, Any] = {"epoch": self.epoch, "consumed": self.consumed}
        if self.drawn is not None:
            state["drawn"] = self.drawn.tolist()
        return state

    def load_state(self, state: dict) -> None:
        self.epoch, self.consumed, self._iterator = state["epoch"], state["consumed"], None
        if self.mix is not None:
            if "drawn" in state:
                self.drawn = np.asarray(state["drawn"], dtype=np.int64)
            else:  # a checkpoint from before the mix was counted: its finished epochs, at this world size
                full = self.batches_per_epoch * self.batch_size * self.world_size
                self.drawn = sum((self._drawn_in(e, full) for e in range(self.epoch)),
                                 np.zeros(len(self.mix.names), dtype=np.int64))

    def _drawn_in(self, epoch: int, consumed: int) -> np.ndarray:
        """Per-source counts of the first `consumed` global positions of `epoch` (wrapping as rank_batches does)."""
        assert self.mix is not None  # only asked when the stream has a source mix
        order = epoch_order(_length(self.dataset), self.seed, self.stream, epoch, self.lengths, self.mix)
        return self.mix.counts(order[np.arange(consumed) % len(order)])

    def source_mix(self) -> dict | None:
        """Requested and realised share of each source over every position drawn so far, on all ranks together
        (a skipped unreadable sample still counts here; the trainer counts those separately)."""
        if self.mix is None:
            return None
        return self.mix.summary(self.drawn + self._drawn_in(self.epoch, self.consumed))

    def _start_epoch(self) -> None:
        if self._loader is None:
            # One loader for the whole run: its persistent workers are started once, not re-forked every epoch;
            # the epoch reaches them inside each index as an (epoch, index) pair.
            self._loader = DataLoader(self.dataset, batch_sampler=_EpochBatches(self), collate_fn=collate_samples,
                                      num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                                      persistent_workers=self.num_workers > 0)
        self._iterator = iter(self._loader)

    def close(self) -> None:
        """Shut the loader's workers down now (a later next() starts a new loader)."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)  # torch's own clean-up of its workers
        if shutdown is not None:
            shutdown()
        self._iterator = self._loader = None

    def next(self) -> Items:
        """The next batch; rolls over to the next epoch at the end of one."""
        while True:
            if self._iterator is None:
                self._start_epoch()
            assert self._iterator is not None
            try:
                batch = next(self._iterator)
            except StopIteration:
                if self.drawn is not None:
                    self.drawn = self.drawn + self._drawn_in(self.epoch, self.consumed)
                self.epoch, self.consumed, self._iterator = self.epoch + 1, 0, None
                continue
            self.consumed += self.batch_size * self.world_size
            return batch


class _EpochBatches:
    """The batch sampler of a BatchStream's loader: this rank's batches of the stream's current epoch from its
    current position, as (epoch, index) pairs. Iterated in the main process when an epoch starts."""

    def __init__(self, stream: BatchStream):
        self.stream = stream

    def __iter__(self):
        s = self.stream
        epoch = s.epoch
        for batch in rank_batches(_length(s.dataset), s.batch_size, s.seed, s.stream, epoch, s.consumed, s.rank,
                                  s.world_size, s.lengths, s.mix):
            yield [(epoch, index) for index in batch]


class EpochConcatDataset(ConcatDataset):
    """ConcatDataset that also routes (epoch, index) pairs to the right part."""

    def __getitem__(self, index):
        if not isinstance(index, tuple):
            return super().__getitem__(index)
        epoch, index = index
        part = bisect.bisect_right(self.cumulative_sizes, index)
        offset = self.cumulative_sizes[part - 1] if part else 0
        return self.datasets[part][(epoch, index - offset)]


def item_texts(dataset) -> list[str]:
    """The text of each item without loading any media: the caption trained on, or the question."""
    return [item["references"][0] if "references" in item else item["question"]
            for part in getattr(dataset, "datasets", [dataset]) for item in part.items]


def item_lengths(dataset) -> list[int]:
    """Text length (words) of each item."""
    return [len(text.split()) for text in item_texts(dataset)]
