"""The tiny preset runs on one intra-op thread unless the user chose (OMP_NUM_THREADS); real presets keep torch's."""

import subprocess
import sys

CHECK = """
import torch
from safe.models.presets import get_preset
from safe.core.threads import set_intra_op_threads
torch.set_num_threads(2)
print(set_intra_op_threads(get_preset({preset!r}), torch.device("cpu")))
"""


def threads_for(preset: str, env: dict) -> int:
    done = subprocess.run([sys.executable, "-c", CHECK.format(preset=preset)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.strip())


def test_tiny_runs_on_one_thread_unless_the_user_chose():
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert threads_for("tiny", env) == 1
    assert threads_for("llava-1.5-7b", env) == 2          # a real model on CPU keeps what it was given
    assert threads_for("tiny", {**env, "OMP_NUM_THREADS": "3"}) == 2  # the user's explicit choice stands
