"""Seeded evaluation subsets that represent their split.

The official VQA files are grouped by image (about 5 questions each), so the first N questions cover only N/5
images; `spread_subset` draws the N at random and spreads them over as many groups (images) as it can. The same
seed gives the same subset in every run, so runs evaluated with it compare item for item.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def spread_subset(groups: Sequence[Hashable], n: int, seed: int) -> list[int]:
    """Indices of ``n`` items, one from each group (groups in a seeded random order, the item within a group at
    random) before a second from any group; returned in their original order. All items when ``n`` ≥ len."""
    if n >= len(groups):
        return list(range(len(groups)))
    rng = np.random.default_rng(seed)
    members: dict[Hashable, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    keys = list(members)
    queues = [[members[keys[k]][j] for j in rng.permutation(len(members[keys[k]]))] for k in rng.permutation(len(keys))]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        for queue in queues:
            if depth < len(queue):
                chosen.append(queue[depth])
                if len(chosen) == n:
                    break
        depth += 1
    return sorted(chosen)
