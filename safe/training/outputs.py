"""Run directory outputs: config.json at start, atomic metrics.json, train_log.jsonl, plots."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from safe.core.diskspace import reporting_disk_full
from safe.core.errors import SafeError
from safe.core.files import atomic_write_text

PACKAGES = ("safe", "torch", "transformers", "peft", "tokenizers", "safetensors", "soundfile", "soxr",
            "numpy", "pycocoevalcap")


def new_run_dir(output_root: str | Path, variant: str, run_name: str | None = None) -> Path:
    """`<root>/<YYYYmmdd_HHMMSS>_<variant>`; a same-second collision gets a numeric suffix, never a reuse."""
    root = Path(output_root)
    root.mkdir(parents=True, exist_ok=True)
    base = run_name or f"{time.strftime('%Y%m%d_%H%M%S')}_{variant}"
    candidate, n = root / base, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
            candidate = root / f"{base}_{n}"


def _json_safe(value):
    """NaN/inf are not JSON: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | Path, payload) -> None:
    """Replace `path` atomically (safe.core.files: the run's file-mode policy, a full disk as one sentence)."""
    atomic_write_text(path, json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def command_line() -> str:
    """The command that started this process, as it would be typed again (model cards quote it)."""
    argv = sys.argv or [""]
    script = Path(argv[0])
    if script.name == "__main__.py":
        head = ["python", "-m", script.parent.name]    # python -m safe
    elif script.suffix == ".py":
        head = ["python", argv[0]]                       # the seed entry points, also under torchrun
    else:
        head = [script.name or "python"]                 # the `safe` console script
    return shlex.join(head + argv[1:])


def environment() -> dict:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": versions,
            "git_commit": git_commit(), "command": command_line()}


class RunLogger:
    """Append-only train log; one JSON object per line, flushed so a crash keeps what was logged.

    `sinks` receive the same records (e.g. TensorBoard), so every tracker sees exactly what the log holds.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, sinks: list | None = None):
        self.path = Path(run_dir) / "train_log.jsonl"
        self.enabled = enabled
        self.sinks = sinks or []

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = _json_safe({"time": round(time.time(), 3), **record})
        data = (json.dumps(record) + "\n").encode("utf-8")
        with reporting_disk_full(self.path, len(data)):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask gives the policy's mode
            try:
                end = os.fstat(fd).st_size
                try:
                    done = 0
                    while done < len(data):
                        done += os.write(fd, data[done:])
                except OSError:
                    os.ftruncate(fd, end)  # no half line for the next record to be glued onto
                    raise
            finally:
                os.close(fd)
        for sink in self.sinks:
            sink(record)


    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def read_log(run_dir: Path) -> list[dict]:
    """The log's records. A last line cut short (a crash or a full disk mid-write) is skipped; any other line
    that does not parse is an error naming file and line."""
    path = Path(run_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):
                print(f"warning: {path}:{number}: skipped the last line, cut short ({exc.msg}).", file=sys.stderr)
                continue
            raise SafeError(f"{path}:{number}: not a JSON record ({exc.msg}); fix or remove that line.") from None
    return records
