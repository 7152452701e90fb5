"""Per-source sampling weights for the training audio stream (`--source-weights audiocaps=1,wavcaps=0.5`).

A weight is a share of the stream, not a per-row factor: with audiocaps=1,wavcaps=0.5 two thirds of the training
positions come from AudioCaps and one third from WavCaps, however many rows each has (SLAM-LLM / LLaVA style).
An epoch keeps its usual length (one position per training row of all sources together); each position draws its
source from the weights, and each source hands out its rows in a fresh permutation per epoch, starting another
permutation when a heavily weighted small source runs out. The order is a pure function of (seed, stream, epoch),
so it is world-size independent and a run resumes mid-epoch exactly as the unweighted order does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from safe.core.errors import SafeError

SOURCES = ("audiocaps", "wavcaps", "clotho")  # training sources, in the order they are concatenated
_MIX_SALT = 1  # keeps the mixed order's random stream apart from the plain permutation's


def parse_source_weights(value) -> dict[str, float] | None:
    """`"audiocaps=1,wavcaps=0.5"` (the flag) or a mapping (YAML, config.json) -> {source: weight}; None stays."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        pairs = []
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            if "=" not in item:
                raise SafeError(f"--source-weights entry {item!r} is not NAME=WEIGHT; write e.g. "
                                "audiocaps=1,wavcaps=0.5.")
            name, weight = (text.strip() for text in item.split("=", 1))
            pairs.append((name, weight))
    elif isinstance(value, dict):
        pairs = list(value.items())
    else:
        raise SafeError(f"--source-weights must be NAME=WEIGHT pairs such as audiocaps=1,wavcaps=0.5, not {value!r}.")
    weights: dict[str, float] = {}
    for name, weight in pairs:
        if name not in SOURCES:
            raise SafeError(f"--source-weights names {name!r}; the training sources are {', '.join(SOURCES)}.")
        if name in weights:
            raise SafeError(f"--source-weights names {name} twice; give each source once.")
        try:
            number = float(weight)
        except (TypeError, ValueError):
            raise SafeError(f"--source-weights gives {name} the weight {weight!r}, which is not a number.") from None
        if not np.isfinite(number) or number < 0:
            raise SafeError(f"--source-weights gives {name} the weight {weight!r}; weights must be >= 0.")
        weights[name] = number
    if not any(w > 0 for w in weights.values()):
        raise SafeError("--source-weights gives every source weight 0; at least one source needs a positive weight.")
    return {name: weights[name] for name in SOURCES if name in weights}  # a fixed order in config.json


@dataclass
class SourceMix:
    """The training audio sources as parts of one concatenated dataset, with their sampling weights.

    ``weights`` None means the plain order (a uniform permutation of all rows, so each source's share is its
    size); the mix then only reports what was drawn."""

    names: list[str]
    sizes: list[int]
    weights: list[float] | None = None

    def __post_init__(self):
        self.ends = np.cumsum(self.sizes)  # part i holds concatenated indices [ends[i-1], ends[i])

    @property
    def total(self) -> int:
        return int(self.ends[-1])

    def requested(self) -> dict[str, float]:
        """Each source's share of the stream: its weight over the sum, or its size over the total."""
        values = np.asarray(self.weights if self.weights is not None else self.sizes, dtype=np.float64)
        return {name: float(v / values.sum()) for name, v in zip(self.names, values)}

    def epoch_order(self, seed: int, stream: int, epoch: int) -> np.ndarray:
        """The weighted order of one epoch: `total` concatenated indices."""
        rng = np.random.default_rng([seed, stream, epoch, _MIX_SALT])
        shares = np.asarray(list(self.requested().values()))
        sources = rng.choice(len(self.names), size=self.total, p=shares)
        order = np.empty(self.total, dtype=np.int64)
        for part, size in enumerate(self.sizes):
            where = np.flatnonzero(sources == part)
            rounds = -(-len(where) // size)  # permutations needed when a small source is drawn more than its size
            picks = np.concatenate([rng.permutation(size) for _ in range(rounds)] or [np.empty(0, np.int64)])
            order[where] = picks[: len(where)] + (self.ends[part] - size)
        return order

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ends, indices, side="right")

    def counts(self, indices: np.ndarray) -> np.ndarray:
        return np.bincount(self.source_of(indices), minlength=len(self.names))

    def summary(self, drawn: np.ndarray) -> dict[str, dict]:
        """{source: {requested share, positions drawn, realised share, rows}} for metrics.json and the log."""
        total = max(int(drawn.sum()), 1)
        return {name: {"requested": round(share, 6), "drawn": int(count), "realised": round(int(count) / total, 6),
                       "rows": int(size)}
                for (name, share), count, size in zip(self.requested().items(), drawn, self.sizes)}
