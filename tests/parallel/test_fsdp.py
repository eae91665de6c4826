"""FSDP2 with expert parallelism on a 2-D (data × expert) mesh of 2 and 4
gloo processes equals one process on the whole batch: forward, auxiliary
loss, every gradient, the global gradient norm (relative), and 5
SGD-momentum steps with clipping
(losses and parameters), within 1e-5. Cases: experts sharded over all ranks
(P = W), data parallel only (P = 1: FSDP shards the experts too), and W > E
(E = 2 on 4 ranks: experts sharded over 2, replicated over 2), and the
dropless backend with experts sharded over 2 ranks (on 2, and on a 2 x 2
mesh of 4: variable row counts cross the exchange). Each rank
holds about 1/W of the non-expert parameters and 1/P of the experts."""
from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp

from .fsdp_worker import worker

pytestmark = pytest.mark.distributed

# (E, expert shards P[, dropless])
CASES = {2: [(4, 2), (4, 1), (4, 2, True)], 4: [(4, 4), (2, 2), (8, 1), (4, 2, True)]}


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp_with_expert_parallelism_matches_one_process(world, tmp_path):
    mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path), CASES[world]), nprocs=world, join=True)
    ranks = [json.load(open(os.path.join(tmp_path, f"rank{r}.json"))) for r in range(world)]
    for case in ranks[0]:
        worst = {check: max(r[case][check] for r in ranks)
                 for check in ("logits", "aux", "grads", "norm", "loss", "params")}
        print(world, case, {k: f"{v:.1e}" for k, v in worst.items()},
              [(r[case]["param_bytes"], round(r[case]["expected_param_bytes"])) for r in ranks])
        for check, value in worst.items():
            assert value <= 1e-5, (world, case, check, value)
        for r in ranks:
            got, want = r[case]["param_bytes"], r[case]["expected_param_bytes"]
            assert got <= 1.1 * want + 4096, (world, case, got, want)  # FSDP pads uneven shards
            assert r[case]["opt_bytes"] <= 1.1 * want + 4096  # SGD momentum: one buffer per local parameter
            assert got < r[case]["total_param_bytes"] / 1.5
