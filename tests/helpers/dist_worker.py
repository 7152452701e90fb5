"""Run under torchrun by tests/test_distributed.py: train a few steps, then dump this rank's trainable state.

    torchrun --nproc_per_node=N tests/helpers/dist_worker.py CONFIG_JSON DUMP_DIR [STOP_AFTER]

With STOP_AFTER the run checkpoints after that many steps and stops as a SIGTERM would make it.
"""

import json
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
