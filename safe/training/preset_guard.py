"""The tiny preset is the toy world's model: `safe train` refuses to train it on real data unless it was named.

`tiny` is the default preset (it is what runs with no download), so a real-data command that forgets
`--model-config` would otherwise spend hours training the toy model on AudioCaps. A toy world carries the file
`toy_world.json` (written by `safe data synth`), which is how it is recognised.
"""

from __future__ import annotations

from pathlib import Path

from safe.errors import SafeError

TOY_WORLD_MARK = "toy_world.json"


def is_toy_world(data_root: str | Path) -> bool:
    return (Path(data_root) / TOY_WORLD_MARK).is_file()


def check_preset_fits_data(config, preset_named: bool) -> None:
    """Refuse the tiny preset, chosen by default, on a data root that is not a toy world."""
    root = Path(config.data.data_root)
    if config.model.preset != "tiny" or preset_named or not root.is_dir() or is_toy_world(root):
        return  # a missing data root is the data loader's error, with its own fix
    raise SafeError(f"{root} is not a toy world (no {TOY_WORLD_MARK}) but the model is the tiny toy preset, the "
                    "default; add --model-config llava-1.5-7b to train the real model (fetch it first with "
                    "`safe models download --preset llava-1.5-7b`), or --model-config tiny to train the toy model "
                    "on this data anyway.")
