"""A lock on a run folder while a process trains in it, so two `--resume auto` processes started together cannot
both pick the same run.

`RunLock(run_dir)` takes an exclusive, non-blocking flock on `<run_dir>/run.lock` and writes the holder's pid and
host into it. The kernel drops the lock when the holder exits or is killed, so a crash never leaves a stale lock;
the file itself stays (deleting it would let a waiter lock an orphaned inode while a newcomer locks a new one).
Forked children (DataLoader workers) share the holder's lock; that is harmless, they die with it.

A file system without locks (Lustre mounted without `flock`, some NFS setups) makes flock fail with ENOSYS or
EOPNOTSUPP: the run then goes ahead unlocked, with a warning, rather than not at all.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from safe.core.errors import SafeError

LOCK_FILE = "run.lock"
NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}  # what flock says on a file system without locks


class RunLockedError(SafeError):
    """Another process holds the run folder's lock."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self.locked = False  # False while held on a file system without locks

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if not self.run_dir.is_dir():
            raise SafeError(f"Run folder {self.run_dir} does not exist; check the path.")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask gives the run's file mode
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else \
                "another process"
            raise RunLockedError(f"Run folder {self.run_dir} is in use by {who} (lock {self.path}); wait for it to "
                                 "finish or stop it, then run the same command again.") from None
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                os.close(fd)
                raise
            print(f"warning: the file system of {self.run_dir} does not support locks ({os.strerror(exc.errno)}); "
                  "the run goes ahead unlocked, so do not start a second --resume of it until this one has exited "
                  "(on Lustre, mount with -o flock).", file=sys.stderr)
        except BaseException:
            os.close(fd)
            raise
        else:
            self.locked = True
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # no holder named once it is free
            if self.locked:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd, self.locked = None, False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
