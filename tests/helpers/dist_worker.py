"""Run under torchrun by tests/test_distributed.py: train a few steps, then dump this rank's trainable state.

    torchrun --nproc_per_node=N tests/helpers/dist_worker.py CONFIG_JSON DUMP_DIR [STOP_AFTER]

With STOP_AFTER the run checkpoints after that many steps and stops as a SIGTERM would make it. With
SAFE_TEST_FAIL=RANK:STEP in the environment, that rank raises an error when it starts that step.
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from safe.training.config import build_config
from safe.training.distributed import shutdown
from safe.training.trainer import Trainer


def main() -> None:
    values = json.loads(Path(sys.argv[1]).read_text())
    dump = Path(sys.argv[2])
    stop_after = int(sys.argv[3]) if len(sys.argv) > 3 else None
    trainer = Trainer(build_config(cli_values=values))
    if os.environ.get("SAFE_TEST_FAIL"):
        rank, step = map(int, os.environ["SAFE_TEST_FAIL"].split(":"))
        real_step = trainer.train_step

        def failing_step():
            if trainer.dist.rank == rank and trainer.step == step:
                raise RuntimeError(f"injected failure on rank {rank}")
            return real_step()

        trainer.train_step = failing_step
    if stop_after is None:
        trainer.fit()
    else:
        for _ in range(stop_after):
            trainer.train_step()
        trainer.save()
        trainer._set_state("interrupted", step=trainer.step)
    dump.mkdir(parents=True, exist_ok=True)
    save_file(trainer.model.trainable_state_dict(), str(dump / f"rank{trainer.dist.rank}.safetensors"),
              metadata={"run_dir": str(trainer.run_dir), "step": str(trainer.step)})
    shutdown()


if __name__ == "__main__":
    main()
