"""Atomic, resumable checkpoints of the trainable state only (DESIGN §4, §7).

Layout: `checkpoints/step_<N>/` holds the model's trainable tensors (safetensors + JSON, written by
`SAFEModel.save_trainable`), `trainer_state.pt` (optimizer, scheduler, retention statistics, RNG, data
position; loaded with weights_only=True) and `meta.json`. A checkpoint is written to a temporary folder and
renamed into place, then `checkpoints/latest.json` is replaced atomically, so a kill at any moment leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from safe.errors import SafeError
from safe.training.outputs import write_json_atomic

KEEP_LAST = 2


def _numpy_state() -> str:
    _, keys, pos, has_gauss, cached = np.random.get_state()
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
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, meta: dict) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}"
    tmp = folder / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_trainable(tmp)
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer_state.pt")
    write_json_atomic(tmp / "meta.json", {"step": step, **meta})
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    write_json_atomic(folder / "latest.json", {"path": final.name, "step": step})
    older = sorted(p for p in folder.glob("step_*") if p != final)
    for old in older[: max(0, len(older) - (KEEP_LAST - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    if not pointer.exists():
        return None
    path = pointer.parent / json.loads(pointer.read_text())["path"]
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model) -> dict:
    """Load trainable weights into `model` and return the trainer state (optimizer etc.)."""
    path = Path(path)
    if not (path / "trainer_state.pt").exists():
        raise SafeError(f"{path} is not a complete checkpoint (no trainer_state.pt); pick another or start anew.")
    model.load_trainable(path)
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
