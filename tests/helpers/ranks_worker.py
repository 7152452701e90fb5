"""Run under torchrun (gloo) by tests/test_retention_ranks.py: retention's cross-rank steps on hand-made
gradients that differ per rank, then dump what each rank ended with.

    torchrun --nproc_per_node=2 tests/helpers/ranks_worker.py DUMP_DIR
"""

import functools
import sys
from pathlib import Path

import torch

from safe.retention.fisher import FisherPenalty
from safe.retention.null_space import NullSpaceProjector
from safe.retention.ranks import Ranks
from safe.training.distributed import any_true, average_tensors, init_distributed, shutdown

# Sample gradients of w for sample index i on rank r (NLL = (w * x).sum(), so the gradient is x).
SAMPLES = {0: [torch.tensor([1.0, 0.0, 0.0, 2.0]), torch.tensor([0.0, 5.0, 1.0, 0.0])],
           1: [torch.tensor([0.0, 0.0, 3.0, 1.0]), torch.tensor([2.0, 1.0, 0.0, 0.0])]}


def main() -> None:
    info, _ = init_distributed()
    ranks = Ranks(info.rank, info.world_size, functools.partial(average_tensors, info=info),
                  functools.partial(any_true, info=info))
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))

    # A decision one rank's flag makes for all (a per-token gate seen open on rank 0 only).
    decision = ranks.any_true(info.rank == 0)

    # Fisher: rank 0's only sample is non-finite, rank 1 has both of its own.
    fisher = FisherPenalty({"w": w})
    xs = [torch.full((4,), float("nan"))] if info.rank == 0 else SAMPLES[1]
    used = fisher.estimate([functools.partial(lambda x: (w * x).sum(), x) for x in xs], ranks=ranks)

    # Null space: sample i is owned by rank i % 2, whose own sample i it is.
    projector = NullSpaceProjector({"w": w}, rank=2)
    for index in range(2):
        projector.add_owned(index, functools.partial(lambda x: {"w": x}, SAMPLES[info.rank][index]), ranks)

    torch.save({"decision": decision, "fisher_used": used, "fisher": fisher.fisher["w"], "basis": projector.basis,
                "samples": projector.samples}, Path(sys.argv[1]) / f"rank{info.rank}.pt")
    shutdown()


if __name__ == "__main__":
    main()
