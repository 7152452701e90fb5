"""The listening control: caption every clip with *another* clip's audio.

A model that only learned the caption style of the training set ("a man speaks", "birds chirp") from the
projector's bias captions a clip just as well with any audio; one that listens does worse with the wrong clip.
So `audio_listen_gain` = CIDEr-D with each clip's own audio − CIDEr-D with a deranged one (every clip gets a
different clip's audio, scored against its own references).
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


def derangement(n: int, seed: int) -> list[int]:
    """A seeded random permutation of range(n) with no fixed point (Sattolo's algorithm: one n-cycle)."""
    if n < 2:
        raise ValueError("a derangement needs at least two items")
    rng = np.random.default_rng(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i, never i itself: the result is a single cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


class SwappedAudio(Dataset):
    """Item i of ``dataset`` with the audio (or cached features) of item ``partner[i]``: the id and references stay
    item i's, so the caption generated from the other clip is scored against item i's references."""

    def __init__(self, dataset, partner: list[int]):
        self.dataset, self.partner = dataset, partner

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        own = self.dataset.items[index]
        sample = self.dataset[self.partner[index]]
        if sample["kind"] == "bad":
            return {**sample, "id": own["id"]}
        return {**sample, "id": own["id"], "caption": own["references"][0], "references": list(own["references"])}
