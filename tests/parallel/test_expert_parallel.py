"""Expert parallelism on 2 and 4 gloo processes equals one process.

Every case of `vmoe_torch.distributed.selfcheck.CASES` (E = 4, 8; K = 1, 2;
vanilla and BPR; capacity 0.5, where tokens are dropped, and 1.05; Soft
MoE; E^3; dropless, where each rank sends a variable number of rows to each
expert; the optimal-transport routers, tokens- and experts-choose) and 5
training steps (capacity 0.5 and dropless) run inside one process group per
world size.
"""
from __future__ import annotations

import pytest

from vmoe_torch.distributed import selfcheck

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_single_process(world, tmp_path):
    worst = selfcheck.run(world, str(tmp_path))
    assert len(worst) == len(selfcheck.CASES) + len(selfcheck.TRAINING)
    for case, diffs in worst.items():
        for check, value in diffs.items():
            assert value <= 1e-5, (world, case, check, value)


def test_compiled_expert_parallel_layer_equals_eager(tmp_path):
    """The expert-parallel MoE layer under torch.compile(fullgraph=True,
    dynamic=True) on 2 ranks: outputs and gradients equal to the eager
    layer's, for three seeds and group counts without recompiling."""
    import json

    import torch.multiprocessing as mp

    from .compile_worker import worker
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        worst = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert worst["out"] <= 1e-6 and worst["grads"] <= 1e-6, worst
