"""Media files named by what they are, not where they are, for the caches that outlive a data staging.

A file's *content identity* is its path relative to the data root, its size and a BLAKE2b hash of its bytes: moving
or re-staging the data root (node-local scratch, another mount) keeps it, and any change to the file changes it. A
file's *location* (absolute path, size, mtime) is a stat away; hashing reads the whole file. So caches look an entry
up by location first and by content identity only when that misses, then record the new location as an alias
(safe.data.shard_store): after a move each file is hashed once, not once per read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from safe.data.shard_store import entry_id

HASH = "blake2b-128"


class FileIdentity:
    def __init__(self, data_root: str | Path | None = None):
        self.data_root = Path(data_root).resolve() if data_root is not None else None

    def location(self, path: str | Path) -> dict:
        """Where the file is now: {"abs", "size", "mtime_ns"} (OSError when it does not exist)."""
        stat = os.stat(path)
        return {"abs": _absolute(str(path)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def content(self, path: str | Path, location: dict | None = None) -> dict:
        """What the file is: {"path" (relative to the data root; absolute outside it), "size", "hash"}."""
        location = location or self.location(path)
        return {"path": self.relative(location["abs"]), "size": location["size"],
                "hash": _content_hash(location["abs"], location["size"], location["mtime_ns"])}

    def relative(self, absolute: str) -> str:
        if self.data_root is not None:
            try:
                return Path(absolute).relative_to(self.data_root).as_posix()
            except ValueError:
                pass
        return absolute  # a file outside the data root (--allow-outside-paths) is named by where it is


class FileKeyedStore:
    """Entries of a ShardStore derived from one file plus a few settings (``extra``, e.g. a crop window), keyed by the
    file's content identity and found by its location first (see the module's note)."""

    def __init__(self, store, identity: FileIdentity):
        self.store, self.identity = store, identity

    def _ids(self, path, extra: dict):
        location = self.identity.location(path)
        return location, entry_id(canonical({"location": location, **extra}))

    def _content_id(self, path, location: dict, extra: dict) -> bytes:
        return entry_id(canonical({"file": self.identity.content(path, location), **extra}))

    def get(self, path, extra: dict) -> bytes | None:
        """The entry's bytes, or None (a missing file is None too: the caller's loader reports it)."""
        try:
            location, located = self._ids(path, extra)
            blob = self.store.get(located)
            if blob is not None:
                return blob
            content = self._content_id(path, location, extra)
        except OSError:
            return None
        blob = self.store.get(content)
        if blob is not None:
            self._alias(located, content)  # moved or re-staged: next time a stat finds it
        return blob

    def _alias(self, located: bytes, content: bytes) -> None:
        from torch.utils.data import get_worker_info

        if get_worker_info() is None:  # loader workers only read; the training process records what it finds
            self.store.alias(located, content)

    def contains(self, path, extra: dict) -> bool:
        try:
            location, located = self._ids(path, extra)
            if self.store.contains(located):
                return True
            content = self._content_id(path, location, extra)
        except OSError:
            return False
        if self.store.contains(content):
            self._alias(located, content)
            return True
        return False

    def put(self, path, extra: dict, blob: bytes) -> None:
        location, located = self._ids(path, extra)
        content = self._content_id(path, location, extra)
        self.store.put(content, blob)
        self.store.alias(located, content)


def canonical(parts: dict) -> bytes:
    """The bytes a cache hashes into an entry id: sorted-key JSON."""
    return json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()


@functools.lru_cache(maxsize=1 << 20)
def _absolute(path: str) -> str:
    return str(Path(path).resolve())  # several syscalls: done once per path


@functools.lru_cache(maxsize=1 << 18)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:  # size/mtime: a rewritten file is hashed again
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
