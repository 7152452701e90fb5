"""The default model follows the data: the tiny toy preset on a toy world, LLaVA-1.5-7B on real data.

`tiny` is what runs with no download, so it was the default; a real-data command that left out `--model-config`
(the user's own seed command, `run_full_training.py --variant ... --data-root DIR`, has no such flag) would then
have spent hours training the toy model on AudioCaps. Now an unnamed preset is chosen by the data root: a toy world
carries `toy_world.json` (written by `safe data synth`). Naming a preset always wins, tiny included.
"""

from __future__ import annotations

from pathlib import Path

TOY_WORLD_MARK = "toy_world.json"
REAL_DATA_PRESET = "llava-1.5-7b"


def is_toy_world(data_root: str | Path) -> bool:
    return (Path(data_root) / TOY_WORLD_MARK).is_file()


def default_preset_for(data_root: str | Path) -> str | None:
    """The preset an unnamed --model-config means for this data root; None keeps the built-in default (tiny) for
    a toy world, or when the root does not exist (the data loader then says how to stage data)."""
    root = Path(data_root)
    if not root.is_dir() or is_toy_world(root):
        return None
    return REAL_DATA_PRESET
