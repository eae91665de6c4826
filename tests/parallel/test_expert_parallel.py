"""Expert parallelism on 2 and 4 gloo processes equals one process.

Every case of `vmoe_torch.distributed.selfcheck.CASES` (E = 4, 8; K = 1, 2;
vanilla and BPR; capacity 0.5, where tokens are dropped, and 1.05; Soft
MoE; E^3; dropless, where each rank sends a variable number of rows to each
expert) and 5 training steps (capacity 0.5 and dropless) run inside one
process group per world size.
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
