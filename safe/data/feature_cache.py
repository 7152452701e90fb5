"""On-disk cache of frozen audio-encoder outputs (DESIGN §10).

An entry is keyed by the clip (absolute path, size, mtime), the encoder id, the sample rate, the clip length
and the crop window (an index into `safe.data.audio.window_starts`), so a changed file or encoder simply misses.
Entries are safetensors files written atomically, each with a CRC-32 of its values; one that fails to load, carries
another key, fails its checksum (a flipped bit) or has none (an older format), or holds non-finite values is
deleted, counted in `rejected`, reported on stderr and recomputed. Values are stored in the encoder's own dtype,
exactly as the encoder returned them: a cached feature is `torch.equal` to the encode that wrote it. Encoders are
not bit-stable across batch compositions (measured: up to ~1e-6 for the tiny conv encoder), so a run with the cache
is bit-identical to one without it while batches are the same (the first epoch) and equal to float rounding
afterwards.

Reads in the training process go through an in-memory LRU layer (``memory_mb``) keyed by the same key, so a repeat
costs a stat instead of a safetensors open (1-2 ms an item on the tiny preset, measured): serial loading,
evaluation clips and distractors. DataLoader workers do not fill it: they read the disk in parallel with the step,
and batches reach them round-robin with new crops each epoch, so their own layers would rarely hit. A changed file
still misses because its key changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import get_worker_info

from safe.cache import cache_dir
from safe.diskspace import on_disk
from safe.files import atomic_write


def default_cache_root() -> Path:
    return cache_dir("features")


DEFAULT_MEMORY_MB = 1024
REPORTED_REJECTS = 5  # per process; later rejected entries are only counted


def checksum(features: torch.Tensor) -> str:
    """CRC-32 of the tensor's bytes, as stored in an entry's metadata."""
    raw = features.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(raw):08x}"


@functools.lru_cache(maxsize=1 << 20)
def _absolute(path: str) -> str:
    return str(Path(path).resolve())  # several syscalls: done once per path


def encoder_cache_id(encoder) -> str:
    """The encoder's id plus the dtype it computes in: bf16 and fp32 features of one clip are different entries."""
    dtype = next(encoder.parameters()).dtype
    return f"{encoder.encoder_id}|{str(dtype).removeprefix('torch.')}"


class FeatureCache:
    def __init__(self, root: str | Path, encoder_id: str, sample_rate: int, clip_seconds: float,
                 memory_mb: float = DEFAULT_MEMORY_MB):
        self.encoder_id, self.sample_rate, self.clip_seconds = encoder_id, sample_rate, clip_seconds
        encoder_key = hashlib.sha256(f"{encoder_id}|{sample_rate}|{clip_seconds}".encode()).hexdigest()[:16]
        self.root = Path(root) / encoder_key
        self.memory_bytes = int(memory_mb * 2**20)
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_used = 0
        self.rejected = 0  # entries found bad on read (deleted, to be recomputed)

    @classmethod
    def for_encoder(cls, encoder, root: str | Path | None = None, memory_mb: float = DEFAULT_MEMORY_MB):
        """The cache of a loaded frozen encoder (the one constructor the trainer and `safe cache-features` share)."""
        return cls(root or default_cache_root(), encoder_cache_id(encoder), encoder.sample_rate, encoder.clip_seconds,
                   memory_mb)

    def __getstate__(self):  # a pickled copy (spawned workers) starts with an empty memory layer
        return {**self.__dict__, "_memory": OrderedDict(), "_memory_used": 0}

    def key(self, path: str | Path, window: int) -> str:
        stat = os.stat(path)
        return json.dumps({"path": _absolute(str(path)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                           "encoder": self.encoder_id, "sample_rate": self.sample_rate,
                           "clip_seconds": self.clip_seconds, "window": window}, sort_keys=True)

    def contains(self, path: str | Path, window: int) -> bool:
        """Whether an entry file exists (not verified: a corrupt one is caught and recomputed when read)."""
        try:
            key = self.key(path, window)
        except OSError:
            return False
        return key in self._memory or self._file(key).is_file()

    def _remember(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.memory_bytes or get_worker_info() is not None:
            return
        if key in self._memory:
            self._memory_used -= self._memory[key].numel() * self._memory[key].element_size()
        self._memory[key] = features
        self._memory.move_to_end(key)
        self._memory_used += size
        while self._memory_used > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_used -= old.numel() * old.element_size()

    def _file(self, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.safetensors"

    def get(self, path: str | Path, window: int) -> torch.Tensor | None:
        try:
            key = self.key(path, window)
        except OSError:
            return None  # a missing clip is the loader's business
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        file = self._file(key)
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), "pt") as handle:
                stored = handle.metadata() or {}
                # A copy: the tensor safetensors returns keeps the whole file memory-mapped while it lives, and
                # thousands of held entries would exhaust the process's mappings.
                features = handle.get_tensor("features").clone()
        except (OSError, MemoryError):
            return None  # could not read it now (a race, no memory): no evidence the entry is bad
        except Exception:
            return self._reject(file, "cannot be decoded")
        if stored.get("key") != key:
            return self._reject(file, "belongs to another clip")
        if stored.get("crc32") != checksum(features):
            return self._reject(file, "fails its checksum" if "crc32" in stored else "has no checksum (older format)")
        if not torch.isfinite(features.float()).all():
            return self._reject(file, "holds non-finite values")
        self._remember(key, features)
        return features

    def _reject(self, file: Path, why: str) -> None:
        """Delete a bad entry (the caller recomputes it), count it, and say so for the first few."""
        file.unlink(missing_ok=True)
        self.rejected += 1
        if self.rejected <= REPORTED_REJECTS:
            more = "; further bad entries are only counted" if self.rejected == REPORTED_REJECTS else ""
            print(f"warning: feature cache entry {file} {why}: deleted, it will be recomputed{more}.",
                  file=sys.stderr)
        return None

    def put(self, path: str | Path, window: int, features: torch.Tensor) -> None:
        key = self.key(path, window)
        features = features.detach().to("cpu").clone(memory_format=torch.contiguous_format)  # a copy: a row view would keep its whole batch alive
        metadata = {"key": key, "crc32": checksum(features)}
        atomic_write(self._file(key), lambda tmp: save_file({"features": features}, str(tmp), metadata=metadata),
                     needed=self.entry_bytes(features))
        self._remember(key, features)

    @staticmethod
    def entry_bytes(features: torch.Tensor) -> int:
        """Disk space one entry of these features takes (values, header with the key, block rounding)."""
        return on_disk(features.numel() * features.element_size() + 1024)
