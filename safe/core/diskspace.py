"""Full disks as one sentence: a free-space check before large writes whose size is known, and a full disk met
while writing (ENOSPC, a full quota) turned into a SafeError naming the path and the space needed.

Python raises OSError(errno 28) for a full disk; other writers report it only in a chained exception
(torch.save into a file object) or in their message (safetensors' Rust writer: "os error 28").
"""

from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path

from safe.core.errors import SafeError

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class DiskFullError(SafeError):
    """Not enough free space for a write; `path` and `needed` (bytes, or None when unknown) say where and how much."""

    def __init__(self, message: str, path: Path, needed: int | None):
        super().__init__(message)
        self.path, self.needed = path, needed


def human_size(n: int | None) -> str:
    if n is None:
        return "an unknown amount"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def on_disk(size: int, block: int = 4096) -> int:
    """Bytes a file of `size` bytes takes on a file system of `block`-byte blocks (the common 4 KiB)."""
    return max(1, -(-size // block)) * block


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or an exception it was raised from, says the disk or the quota is full."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if any(text in str(exc) for text in FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(path: str | Path, needed: int | None, note: str | None = None) -> DiskFullError:
    """The one sentence: where, how much is needed, how much is free, what was kept or removed, what to do."""
    path = Path(path)
    free = human_size(free_bytes(path))
    need = f"about {human_size(needed)} free and {free} is free" if needed else f"more than the {free} now free"
    message = (f"Not enough disk space for {path}: it needs {need}" + (f"; {note}" if note else "")
               + "; free some space there (or choose another folder) and run the same command again.")
    return DiskFullError(message, path, needed)


def check_free_space(path: str | Path, needed: int | None, note: str | None = None) -> None:
    """Refuse a write of `needed` bytes under `path` before it starts, when the disk cannot hold it."""
    free = free_bytes(path)
    if needed and free is not None and needed > free:
        raise disk_full_error(path, needed, note)


@contextmanager
def reporting_disk_full(path: str | Path, needed: int | None = None, note: str | None = None):
    """Turn a full disk met inside the block into a DiskFullError about `path` (other errors pass unchanged)."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise disk_full_error(path, needed, note) from None
        raise
