"""Atomic, resumable checkpoints of the trainable state only.

Layout: `checkpoints/step_<N>/` holds the model's trainable tensors (safetensors + JSON, written by
`SAFEModel.save_trainable`), `trainer_state.pt` (optimizer, scheduler, retention statistics, RNG, data
position; loaded with weights_only=True) and `meta.json`. A checkpoint is written to a temporary folder, renamed
into place under a name no pointer uses, then `checkpoints/latest.json` is switched to it atomically, and only
then are older folders deleted: at every moment `latest.json` names a complete checkpoint, and a kill at any
moment leaves the previous checkpoint intact. Saving a step again (the same step after a resume or a signal)
writes `step_<N>_1` beside `step_<N>` (or `step_<N>` beside `step_<N>_1`), never over the folder in use.

`latest.json` must name a folder directly inside its own `checkpoints/`: a pointer that does not parse, names a
folder elsewhere (another run's checkpoint) or names an incomplete folder is not followed; the newest complete
checkpoint of the run is used instead, with a warning.
"""

from __future__ import annotations

import itertools
import json
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import cast

import numpy as np
import torch

from safe.core.diskspace import DiskFullError, check_free_space, disk_full_error, is_disk_full
from safe.core.errors import SafeError
from safe.core.files import atomic_write
from safe.training import faults
from safe.training.outputs import write_json_atomic

KEEP_LAST = 2


def _numpy_state() -> str:
    _, keys, pos, has_gauss, cached = cast(tuple, np.random.get_state())  # legacy=True (the default): a tuple
    return json.dumps([keys.tolist(), pos, has_gauss, cached])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": _numpy_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), state["python_pos"]))
    keys, pos, has_gauss, cached = json.loads(state["numpy"])
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        # One state per GPU rank 0 saw; a job resumed on fewer GPUs restores those it has (set_rng_state_all
        # would index past them).
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


POINTER = "latest.json"
_FOLDER_NAME = re.compile(r"step_(\d+)(?:_(\d+))?")
STATE_FILE = "trainer_state.pt"


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as handle:  # a file object, so a full disk surfaces as OSError 28 behind torch's error
        torch.save(obj, handle)


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, meta: dict) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    state = {**trainer_state, "rng": rng_state()}
    needed = _tensor_bytes(model.trainable_state_dict()) + _tensor_bytes(state) + (64 << 10)  # + JSON and headers
    check_free_space(folder, needed)
    tmp = folder / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_trainable(tmp)
        faults.reached("checkpoint")  # the crash tests kill the process here: half a checkpoint on disk
        atomic_write(tmp / STATE_FILE, lambda path: _torch_save(state, path), needed)
        write_json_atomic(tmp / "meta.json", {"step": step, **meta})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed write took
        if isinstance(exc, DiskFullError) or (isinstance(exc, Exception) and is_disk_full(exc)):
            raise disk_full_error(folder, needed, "the previous checkpoint is kept") from None
        raise
    final = _unused_name(folder, step)
    tmp.rename(final)
    write_json_atomic(folder / POINTER, {"path": final.name, "step": step})
    _remove_old(folder, final, step)
    return final


def _unused_name(folder: Path, step: int) -> Path:
    for n in itertools.count():
        candidate = folder / (f"step_{step:08d}" + (f"_{n}" if n else ""))
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise AssertionError("unreachable")


def _folder_step(path: Path) -> tuple[int, int] | None:
    match = _FOLDER_NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 0)) if match else None


def _remove_old(folder: Path, current: Path, step: int) -> None:
    """After the pointer names `current`: drop the folder it replaced (same step), keep KEEP_LAST in all."""
    others = sorted((key, p) for p in folder.iterdir()
                    if p != current and p.is_dir() and (key := _folder_step(p)) is not None)
    replaced = [p for key, p in others if key[0] == step]
    rest = [p for key, p in others if key[0] != step]
    for old in replaced + rest[: max(0, len(rest) - (KEEP_LAST - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(".tmp_step_*"):  # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)


def is_complete(path: Path) -> bool:
    from safe.models.safe_model import CONFIG_FILE, TRAINABLE_FILE

    return path.is_dir() and all((path / name).is_file() for name in (STATE_FILE, "meta.json", TRAINABLE_FILE,
                                                                      CONFIG_FILE))


def _pointed(pointer: Path) -> tuple[Path | None, str]:
    """The checkpoint `latest.json` names, or None and why it cannot be followed."""
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["path"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None, "is not a valid checkpoint pointer"
    if not isinstance(name, str) or not _FOLDER_NAME.fullmatch(name):
        return None, f"names {name!r}, which is not a checkpoint folder of this run"
    target = pointer.parent / name
    if target.is_symlink() or target.resolve().parent != pointer.parent.resolve():
        return None, f"names {name!r}, which leads outside this run"
    if not is_complete(target):
        return None, f"names {name}, which is missing or incomplete"
    return target, ""


def newest_complete_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    found = [(key, p.stat().st_mtime_ns, p) for p in folder.iterdir()
             if (key := _folder_step(p)) is not None and not p.is_symlink() and is_complete(p)]
    return max(found, key=lambda item: (item[0][0], item[1]))[2] if found else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / POINTER
    if not pointer.exists():
        return None
    path, problem = _pointed(pointer)
    if path is not None:
        return path
    fallback = newest_complete_checkpoint(run_dir)
    print(f"warning: {pointer} {problem}; "
          + (f"using the newest complete checkpoint, {fallback.name}, instead." if fallback
             else "the run holds no complete checkpoint."), file=sys.stderr)
    return fallback


def load_checkpoint(path: Path, model) -> dict:
    """Load trainable weights into `model` and return the trainer state (optimizer etc.)."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise SafeError(f"{path} is not a complete checkpoint (no {STATE_FILE}); pick another or start anew.")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests loading it unrestricted, which would run whatever the file holds.
        raise SafeError(f"{state_file} holds objects other than tensors and plain values, so it was not loaded "
                        "(unpickling them could run code); resume from a checkpoint written by `safe train`.") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise SafeError(f"{state_file} is damaged or truncated ({type(exc).__name__}); resume from another "
                        "checkpoint or start anew.") from None
    model.load_trainable(path)
    return state
