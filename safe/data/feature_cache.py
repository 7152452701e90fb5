"""On-disk cache of what the projector consumes: the frozen audio encoder's output on the pre-pool grid.

What is stored: the encoder's features for one (clip, crop window), averaged to the projector's fixed pre-pool grid
(`safe.models.projector.pre_pool`: 32 steps for the real presets, e.g. CLAP's 64 patches or Whisper's 500 frames of
a 10 s clip; the tiny preset keeps its 51 steps). The projector pools that grid to its k tokens, so an entry is
exactly what it would compute from the clip: lossless for the projector, at a fraction of the unpooled size. Values
keep the encoder's dtype (bf16 on GPU), so a cached feature is `torch.equal` to the pre-pooled encode that wrote it.
Encoders are not bit-stable across batch compositions (measured: up to ~1e-6 for the tiny conv encoder), so a run
with the cache is bit-identical to one without it while batches are the same (the first epoch) and equal to float
rounding afterwards.

Where: `<root>/v2/<encoder key>/`, in shards of many entries with an index (safe.data.shard_store), each entry with
a CRC-32 checked on read (a bad entry is skipped, counted in `rejected`, reported and recomputed; the rest of its
shard still serves). The encoder key holds the encoder id and dtype, sample rate, clip length and grid.

Keyed by the clip's content (its path relative to the data root, its size and a hash of its bytes: see
safe.data.file_identity) and the window, so moving or re-staging the data root keeps the cache, and a changed file
misses. Lookups go by location first (a stat), so the hash is read once per file and move.

Reads in the training process go through an in-memory LRU layer (``memory_mb``) keyed by the clip's location, so a
repeat costs a stat: serial loading, evaluation clips and distractors. DataLoader workers do not fill it: they read
the disk in parallel with the step. Only the training process writes (workers return the audio of a miss, and the
step encodes and stores it); new entries reach the disk in shards, at the latest when the process exits.
"""

from __future__ import annotations

import hashlib
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch.utils.data import get_worker_info

from safe.core.cache import cache_dir
from safe.data.file_identity import FileIdentity, FileKeyedStore
from safe.data.shard_store import SHARD_BYTES, ShardStore

FORMAT = "safe-features-2"
DEFAULT_MEMORY_MB = 1024
ENTRY_OVERHEAD = 160  # bytes of a safetensors header around one tensor (name, dtype, shape, offsets)


def default_cache_root() -> Path:
    return cache_dir("features")


def encoder_cache_id(encoder) -> str:
    """The encoder's id plus the dtype it computes in: bf16 and fp32 features of one clip are different entries."""
    dtype = next(encoder.parameters()).dtype
    return f"{encoder.encoder_id}|{str(dtype).removeprefix('torch.')}"


_warned_v1: set[str] = set()


def warn_about_v1(root: Path) -> bool:
    """Say once per folder that it holds entries of the one-file-per-window format (v1), which are not read."""
    if str(root) in _warned_v1 or not root.is_dir():
        return False
    old = [d for d in root.iterdir() if d.is_dir() and len(d.name) == 16 and d.name != "v2"
           and any(len(s.name) == 2 and s.is_dir() for s in d.iterdir())]
    if not old:
        return False
    _warned_v1.add(str(root))
    print(f"note: {root} holds feature-cache entries in the older one-file-per-window format (v1: "
          f"{', '.join(d.name for d in old[:3])}{' ...' if len(old) > 3 else ''}), which this version does not read: "
          f"features are rebuilt in shards under {root / 'v2'} as clips are encoded (`safe cache-features` rebuilds "
          "them ahead of training); delete those v1 folders to free their space.", file=sys.stderr)
    return True


class FeatureCache:
    def __init__(self, root: str | Path, encoder_id: str, sample_rate: int, clip_seconds: float,
                 memory_mb: float = DEFAULT_MEMORY_MB, data_root: str | Path | None = None, grid: int | None = None,
                 shard_bytes: int = SHARD_BYTES):
        self.encoder_id, self.sample_rate, self.clip_seconds, self.grid = encoder_id, sample_rate, clip_seconds, grid
        encoder_key = hashlib.sha256(f"{encoder_id}|{sample_rate}|{clip_seconds}|grid={grid}".encode()).hexdigest()[:16]
        warn_about_v1(Path(root))
        self.root = Path(root) / "v2" / encoder_key
        self.store = ShardStore(self.root, shard_bytes=shard_bytes, label="feature cache")
        self.entries = FileKeyedStore(self.store, FileIdentity(data_root))
        self.memory_bytes = int(memory_mb * 2**20)
        self._memory: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._memory_used = 0

    @classmethod
    def for_encoder(cls, encoder, root: str | Path | None = None, memory_mb: float = DEFAULT_MEMORY_MB,
                    data_root: str | Path | None = None, grid: int | None = None, **kwargs) -> "FeatureCache":
        """The cache of a loaded frozen encoder (the one constructor the trainer and `safe cache-features` share)."""
        return cls(root or default_cache_root(), encoder_cache_id(encoder), encoder.sample_rate, encoder.clip_seconds,
                   memory_mb, data_root, grid, **kwargs)

    def __getstate__(self):  # a pickled copy (spawned workers) starts with an empty memory layer
        return {**self.__dict__, "_memory": OrderedDict(), "_memory_used": 0}

    @property
    def rejected(self) -> int:
        """Entries found bad on read (skipped, to be recomputed)."""
        return self.store.rejected

    def _memory_key(self, path, window: int) -> tuple | None:
        try:
            location = self.entries.identity.location(path)
        except OSError:
            return None
        return location["abs"], location["size"], location["mtime_ns"], window

    def get(self, path: str | Path, window: int) -> torch.Tensor | None:
        memory_key = self._memory_key(path, window)
        if memory_key is None:
            return None  # a missing clip is the loader's business
        if memory_key in self._memory:
            self._memory.move_to_end(memory_key)
            return self._memory[memory_key]
        blob = self.entries.get(path, {"window": window})
        if blob is None:
            return None
        try:
            features = load_bytes(blob)["features"]
        except Exception:
            features = None
        if features is None or not torch.isfinite(features.float()).all():
            self.store.report(f"an entry of {path} (window {window}) holds no finite features; it will be recomputed")
            return None
        self._remember(memory_key, features)
        return features

    def contains(self, path: str | Path, window: int) -> bool:
        """Whether an entry is stored (not verified: a damaged one is caught and recomputed when read)."""
        memory_key = self._memory_key(path, window)
        return memory_key is not None and (memory_key in self._memory
                                           or self.entries.contains(path, {"window": window}))

    def put(self, path: str | Path, window: int, features: torch.Tensor) -> None:
        # A copy: a row view would keep its whole batch alive.
        features = features.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        self.entries.put(path, {"window": window}, save_bytes({"features": features}, metadata={"format": FORMAT}))
        self._remember(self._memory_key(path, window), features)

    def flush(self) -> None:
        """Write pending entries now (they are written anyway once a shard's worth is pending, and at exit)."""
        self.store.flush()

    def _remember(self, key: tuple | None, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if key is None or size > self.memory_bytes or get_worker_info() is not None:
            return
        if key in self._memory:
            self._memory_used -= self._memory[key].numel() * self._memory[key].element_size()
        self._memory[key] = features
        self._memory.move_to_end(key)
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= old.numel() * old.element_size()

    @staticmethod
    def entry_bytes(features: torch.Tensor) -> int:
        """Disk space one entry of these features takes in a shard (values + its header; shards amortise blocks)."""
        return features.numel() * features.element_size() + ENTRY_OVERHEAD
