"""How SAFE writes the files a run (or a data or cache command) keeps: atomically, with one file-mode policy, and
with a full disk reported as one sentence.

Atomic: the content goes to a temporary file in the target's folder, which replaces the target by a rename only
once it is complete, so a crash or a full disk leaves the previous version (or nothing), never half a file.

File modes: everything is created with the mode a plain `open()` / `mkdir` gives, 0666 / 0777 minus the umask
(0644 files and 0755 folders under the usual umask 022; a group-shared umask 002 gives 0664 / 0775). Temporary
files are created 0600 by the operating system, so the policy is applied before the rename.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from safe.core.diskspace import reporting_disk_full


def current_umask() -> int:
    try:  # Linux says it without changing it (changing it would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], object], needed: int | None = None) -> Path:
    """Call `write(temporary_path)`, then give the file the policy's mode and rename it to `path`.

    `needed` (bytes, when known) is what a full-disk error says the write needs."""
    path = Path(path)
    with reporting_disk_full(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())

    return atomic_write(path, write, needed=len(data))


def atomic_write_text(path: str | Path, text: str, fsync: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync)
