"""Many small entries in few files: immutable shards plus an index, for caches of millions of entries.

A writer buffers entries in memory and writes them out together (`flush`, automatically once `shard_bytes` are
pending or `flush_seconds` have passed, and at exit):

    <time>-<writer>-<n>.shard    the entries' bytes back to back (blobs the caller made, e.g. safetensors)
    <time>-<writer>-<n>.index    a .npz: a row per entry (16-byte id, shard, offset, size, CRC-32), the shard names

Both are written with `safe.core.files.atomic_write` (the shard first), so a reader sees a complete shard or none, and
are never modified afterwards: writers (ranks, runs) never share a file, so no locking is needed. An index row may
point into another writer's shard: an alias (the same bytes found under a second id).

Readers load every index at start into sorted numpy arrays (24 bytes an entry however many there are, shared
copy-on-write by forked loader workers) and read an entry with one `pread`. Each entry carries a CRC-32: an entry
whose bytes fail it (a flipped bit, a truncated shard) is skipped, counted in `rejected` and reported; the other
entries of that shard still serve. Ids may repeat (an entry recomputed after a bad read, two ranks writing the same
entry): the newest copy is read first.
"""

from __future__ import annotations

import atexit
import io
import os
import socket
import sys
import time
import uuid
import weakref
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np

from safe.core.files import atomic_write

SHARD_BYTES = 64 << 20        # a shard is written once this much is pending
FLUSH_SECONDS = 300.0         # ... or when the oldest pending entry is this old
REFRESH_SECONDS = 30.0        # a miss looks for other writers' new shards at most this often
OPEN_FILES = 64               # shard files kept open for reading
REPORTED_REJECTS = 5          # per store; later bad entries are only counted
RECENT_ROWS = 50_000          # rows kept in a dict before they are folded into the sorted arrays

ROW = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("shard", "<u4"), ("crc", "<u4"), ("offset", "<u8"), ("size", "<u8")])


def entry_id(key: bytes) -> bytes:
    """The 16-byte id of an entry from its key (any bytes; callers hash a canonical JSON of what it depends on)."""
    import hashlib

    return hashlib.blake2b(key, digest_size=16).digest()


def _split(ident: bytes) -> tuple[int, int]:
    return int.from_bytes(ident[:8], "little"), int.from_bytes(ident[8:], "little")


class ShardStore:
    def __init__(self, root: str | Path, shard_bytes: int = SHARD_BYTES, flush_seconds: float = FLUSH_SECONDS,
                 label: str = "cache"):
        self.root = Path(root)
        self.shard_bytes, self.flush_seconds, self.label = shard_bytes, flush_seconds, label
        self.rejected = 0
        self._reset_reader()
        self._pending: OrderedDict[bytes, bytes] = OrderedDict()   # id -> blob, not yet on disk
        self._pending_aliases: dict[bytes, bytes] = {}             # new id -> id of an entry on disk
        self._pending_bytes = 0
        self._pending_since: float | None = None
        self._writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._written = 0
        atexit.register(_flush_at_exit, weakref.ref(self))

    def _reset_reader(self) -> None:
        self._rows = np.zeros(0, ROW)
        self._bad = np.zeros(0, bool)
        self._recent: dict[bytes, list[tuple]] = {}   # rows loaded since the arrays were last sorted
        self._bad_places: set[tuple[int, int]] = set()  # (shard, offset) of bytes found bad (an entry and its aliases)
        self._shards: list[str] = []
        self._shard_numbers: dict[str, int] = {}
        self._indexes: set[str] = set()
        self._loaded_at: float | None = None
        self._files: OrderedDict[int, int] = OrderedDict()

    def __del__(self):
        # A store dropped before exit (the atexit hook only holds a weak reference) writes what it still holds.
        if getattr(self, "_pending", None):
            _flush_quietly(self)

    def __getstate__(self):
        # A copy for a loader worker: it reads what is on disk, and writes nothing (pending entries stay here).
        state = {**self.__dict__, "_pending": OrderedDict(), "_pending_aliases": {}, "_pending_bytes": 0,
                 "_pending_since": None, "_files": OrderedDict()}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        atexit.register(_flush_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------------------------------- index

    def refresh(self) -> int:
        """Load the indexes written since the last look (by this or other writers); returns how many rows came."""
        self._loaded_at = time.monotonic()
        if not self.root.is_dir():
            return 0
        new = []
        for path in sorted(self.root.glob("*.index")):  # names start with their write time: oldest first
            if path.name in self._indexes:
                continue
            self._indexes.add(path.name)
            try:
                with np.load(path, allow_pickle=False) as saved:
                    rows, names = saved["rows"], [str(n) for n in saved["shards"]]
                if rows.dtype != ROW:
                    raise ValueError("unexpected row layout")
            except Exception as exc:  # a damaged index: its entries miss and are recomputed
                self.report(f"index {path} cannot be read ({exc.__class__.__name__}); its entries will be recomputed")
                continue
            rows = rows.copy()
            rows["shard"] = np.array([self._shard_number(n) for n in names], dtype=np.uint32)[rows["shard"]]
            new.append(rows)
        if not new:
            return 0
        rows = np.concatenate(new)
        if len(rows) + len(self._recent) > RECENT_ROWS:  # e.g. the first look at a large cache: straight to the arrays
            self._merge(rows)
        else:
            for row in rows.tolist():
                self._recent.setdefault(_ident(row[0], row[1]), []).append(row)
        return len(rows)

    def _shard_number(self, name: str) -> int:
        if name not in self._shard_numbers:
            self._shard_numbers[name] = len(self._shards)
            self._shards.append(name)
        return self._shard_numbers[name]

    def _merge(self, new: np.ndarray | None = None) -> None:
        """Fold the recent rows (and ``new`` ones) into the sorted arrays; rows of one id keep their load order."""
        parts = [self._rows]
        if self._recent:
            parts.append(np.array([row for rows in self._recent.values() for row in rows], dtype=ROW))
        if new is not None:
            parts.append(new)
        rows = np.concatenate(parts)
        bad = np.concatenate([self._bad, np.zeros(len(rows) - len(self._bad), bool)])
        order = np.lexsort((rows["lo"], rows["hi"]))  # stable: equal ids keep their load order
        self._rows, self._bad, self._recent = rows[order], bad[order], {}

    def _candidates(self, ident: bytes) -> list[tuple]:
        """(position in the sorted arrays or None, row) of every on-disk copy of ``ident`` not found bad, newest
        first (rows loaded since the last merge are the newest)."""
        if self._loaded_at is None:
            self.refresh()
        out: list[tuple[int | None, tuple]] = [(None, row) for row in reversed(self._recent.get(ident, []))
                                               if (row[2], row[4]) not in self._bad_places]
        hi, lo = _split(ident)
        column = self._rows["hi"]
        start, stop = np.searchsorted(column, np.uint64(hi), "left"), np.searchsorted(column, np.uint64(hi), "right")
        for i in range(int(stop) - 1, int(start) - 1, -1):
            if int(self._rows["lo"][i]) == lo and not self._bad[i]:
                row = tuple(self._rows[i].tolist())
                if (row[2], row[4]) not in self._bad_places:
                    out.append((i, row))
        return out

    # -------------------------------------------------------------------------------------------- read

    def get(self, ident: bytes) -> bytes | None:
        """The entry's bytes, or None when it is not stored (or every copy of it is damaged)."""
        if ident in self._pending:
            return self._pending[ident]
        if ident in self._pending_aliases:
            return self.get(self._pending_aliases[ident])
        for found in (self._candidates(ident), None):
            if found is None:  # a miss: other writers may have added it since we looked
                if self._loaded_at is not None and time.monotonic() - self._loaded_at < REFRESH_SECONDS:
                    return None
                if not self.refresh():
                    return None
                found = self._candidates(ident)
            for position, row in found:
                blob = self._read(row)
                if blob is not None:
                    return blob
                self._mark_bad(ident, position, row)
        return None

    def contains(self, ident: bytes) -> bool:
        """Whether an entry is stored (not verified: a damaged one is found out when read)."""
        return ident in self._pending or ident in self._pending_aliases or bool(self._candidates(ident))

    def _read(self, row) -> bytes | None:
        _, _, shard, crc, offset, size = row
        try:
            fd = self._open(shard)
            blob = os.pread(fd, size, offset)
        except OSError:
            return None
        if len(blob) != size or zlib.crc32(blob) != crc:
            return None
        return blob

    def _open(self, shard: int) -> int:
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        fd = os.open(self.root / self._shards[shard], os.O_RDONLY)
        self._files[shard] = fd
        while len(self._files) > OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return fd

    def _mark_bad(self, ident: bytes, position, row) -> None:
        self._bad_places.add((row[2], row[4]))
        if position is not None:
            self._bad[position] = True
        else:
            self._recent[ident] = [r for r in self._recent.get(ident, []) if r != row]
        name = self._shards[int(row[2])]
        self.report(f"entry {ident.hex()} in {self.root / name} fails its checksum or is cut short; it will be "
                     "recomputed (the shard's other entries still serve)")

    def report(self, what: str) -> None:
        self.rejected += 1
        if self.rejected <= REPORTED_REJECTS:
            more = "; further bad entries are only counted" if self.rejected == REPORTED_REJECTS else ""
            print(f"warning: {self.label}: {what}{more}.", file=sys.stderr)

    # ------------------------------------------------------------------------------------------- write

    def put(self, ident: bytes, blob: bytes) -> None:
        """Add an entry (written at the next flush); an id already pending is replaced."""
        if ident in self._pending:
            self._pending_bytes -= len(self._pending.pop(ident))
        self._pending[ident] = blob
        self._pending_bytes += len(blob)
        self._pending_since = self._pending_since or time.monotonic()
        self._maybe_flush()

    def alias(self, ident: bytes, existing: bytes) -> None:
        """Let ``ident`` find the entry stored under ``existing`` too (no bytes are copied)."""
        if ident != existing:
            self._pending_aliases[ident] = existing
            self._pending_since = self._pending_since or time.monotonic()
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if self._pending_bytes >= self.shard_bytes or \
                (self._pending_since is not None and time.monotonic() - self._pending_since >= self.flush_seconds):
            self.flush()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def flush(self) -> None:
        """Write the pending entries as one shard and its index (aliases: an index only)."""
        if not self._pending and not self._pending_aliases:
            return
        name = f"{time.time_ns():020d}-{self._writer}-{self._written:05d}"  # names sort by time: newest read first
        self._written += 1
        names, rows = [], []
        if self._pending:
            shard = f"{name}.shard"
            names.append(shard)
            offset = 0
            for ident, blob in self._pending.items():
                rows.append((*_split(ident), 0, zlib.crc32(blob), offset, len(blob)))
                offset += len(blob)
            blobs = list(self._pending.values())

            def write_shard(tmp: Path) -> None:
                with open(tmp, "wb") as handle:
                    for blob in blobs:
                        handle.write(blob)

            atomic_write(self.root / shard, write_shard, needed=offset)
        for ident, existing in self._pending_aliases.items():
            target = self._locate(existing, rows, names)
            if target is not None:
                rows.append((*_split(ident), *target))
        index = np.array(rows, dtype=ROW)

        def write_index(tmp: Path) -> None:
            buffer = io.BytesIO()
            np.savez(buffer, rows=index, shards=np.array(names or [""]))
            tmp.write_bytes(buffer.getvalue())

        try:
            atomic_write(self.root / f"{name}.index", write_index, needed=index.nbytes + 4096)
        except BaseException:
            if self._pending:
                (self.root / f"{name}.shard").unlink(missing_ok=True)  # a shard without an index serves nothing
            raise
        self._pending.clear()
        self._pending_aliases.clear()
        self._pending_bytes, self._pending_since = 0, None
        if self._loaded_at is not None:
            self.refresh()  # our own new rows (and anything else new)

    def _locate(self, existing: bytes, new_rows: list, names: list) -> tuple | None:
        """(shard number in this index, crc, offset, size) of ``existing``: in the shard being written or on disk."""
        hi, lo = _split(existing)
        for row in new_rows:
            if row[0] == hi and row[1] == lo and names:
                return (0, *row[3:])
        for _, row in self._candidates(existing):
            name = self._shards[int(row[2])]
            if name not in names:
                names.append(name)
            return (names.index(name), int(row[3]), int(row[4]), int(row[5]))
        return None

    # ------------------------------------------------------------------------------------------- facts

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*") if p.suffix in (".shard", ".index")) if self.root.is_dir() else []

    def close(self) -> None:
        self.flush()
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()


def _ident(hi, lo) -> bytes:
    return int(hi).to_bytes(8, "little") + int(lo).to_bytes(8, "little")


def _flush_at_exit(ref) -> None:
    store = ref()
    if store is not None:
        _flush_quietly(store)


def _flush_quietly(store: ShardStore) -> None:
    """Write a store's pending entries at exit or when it is dropped: say a failure, never raise (it would mask the
    real exit status, or be swallowed by the garbage collector)."""
    try:
        store.flush()
    except Exception as exc:
        print(f"warning: {store.label}: could not write the last entries to {store.root}: {exc}", file=sys.stderr)
