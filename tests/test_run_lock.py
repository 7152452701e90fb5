"""RunLock: one process at a time trains in a run folder. Real processes hold and contend for the lock; a killed
holder leaves no stale lock behind."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from safe.core.errors import SafeError
from safe.training.run_lock import RunLock

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from safe.training.run_lock import RunLock
with RunLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""

TRY = """
import sys
from safe.core.errors import SafeError
from safe.training.run_lock import RunLock
try:
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
except SafeError as exc:
    print(f"refused: {exc}", flush=True)
"""

RACE = """
import sys, time
from safe.core.errors import SafeError
from safe.training.run_lock import RunLock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start at the same instant
try:
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(1.5)
except SafeError:
    print("refused", flush=True)
"""


def python(code: str, *args) -> list[str]:
    return [sys.executable, "-c", code, *map(str, args)]


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(python(HOLD, run, 60), stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = subprocess.run(python(TRY, run), capture_output=True, text=True, cwd=REPO, timeout=60)
        assert other.stdout.startswith("refused: "), other.stdout + other.stderr
        assert f"process {holder.pid}" in other.stdout and str(run) in other.stdout
        with pytest.raises(SafeError, match=f"in use by process {holder.pid}"):
            RunLock(run).acquire()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with the process
        holder.wait()
    again = subprocess.run(python(TRY, run), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.stdout.strip() == "locked", again.stdout + again.stderr


def test_processes_started_together_get_the_lock_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    start = time.time() + 3.0
    procs = [subprocess.Popen(python(RACE, run, start), stdout=subprocess.PIPE, text=True, cwd=REPO)
             for _ in range(3)]
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["locked", "refused", "refused"]


def test_release_lets_the_next_holder_in_and_one_process_cannot_hold_it_twice(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    first = RunLock(run)
    with first:
        with pytest.raises(SafeError, match="in use by process"):
            RunLock(run).acquire()
    with RunLock(run) as second:  # released on exit
        assert second.held
    assert not second.held
    with pytest.raises(SafeError, match="does not exist"):
        RunLock(tmp_path / "missing").acquire()


@pytest.mark.parametrize("code", ["ENOSYS", "EOPNOTSUPP"])
def test_a_file_system_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch, capsys, code):
    # Lustre mounted without -o flock answers flock with ENOSYS; such a cluster must still be able to train.
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(getattr(errno, code), "not supported")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock = RunLock(tmp_path).acquire()
    assert lock.held and not lock.locked
    assert "does not support locks" in capsys.readouterr().err
    assert (tmp_path / "run.lock").read_text().split()[0] == str(os.getpid())
    lock.release()
    assert not lock.held and (tmp_path / "run.lock").read_text() == ""


def test_another_flock_error_is_not_taken_for_a_file_system_without_locks(tmp_path, monkeypatch):
    import errno
    import fcntl

    def broken(fd, operation):
        raise OSError(errno.EIO, "input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="input/output"):
        RunLock(tmp_path).acquire()
