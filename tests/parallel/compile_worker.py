"""Worker of tests/parallel/test_expert_parallel.py's compile check: on each
rank, an expert-parallel MoE layer compiled with fullgraph=True,
dynamic=True (the token exchange traced as functional collectives) against
the same layer eager, in training, over seeds and batch sizes, without
recompiling."""
from __future__ import annotations

import copy
import json
import os

import torch
import torch._dynamo
import torch.distributed as dist

from vmoe_torch.distributed import expert_parallel
from vmoe_torch.distributed.runtime import shutdown
from vmoe_torch.moe import MoeMlp


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ok = False
    try:
        torch.manual_seed(0)
        layer = MoeMlp(16, 32, 4, group_size=16, num_selected_experts=2, batch_priority=True,
                       capacity_factor=0.5).train()
        eager = expert_parallel(torch.nn.ModuleList([layer]))[0]
        traced = copy.deepcopy(eager)
        compiled = torch.compile(traced, fullgraph=True, dynamic=True, backend="aot_eager")
        worst = {"out": 0.0, "grads": 0.0}
        torch._dynamo.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, images in ((1, 2), (2, 4), (3, 3)):  # another seed and group count every call
                x = torch.randn(images, 16, 16, generator=torch.Generator().manual_seed(10 * seed + rank))
                outs = []
                for m, run in ((eager, eager), (traced, compiled)):
                    m.noise_seed = seed
                    m.zero_grad()
                    y, metrics = run(x)
                    (y.square().mean() + metrics["auxiliary_loss"]).backward()
                    outs.append(y.detach())
                worst["out"] = max(worst["out"], float((outs[0] - outs[1]).abs().max()))
                for a, b in zip(eager.parameters(), traced.parameters()):
                    worst["grads"] = max(worst["grads"], float((a.grad - b.grad).abs().max()))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(worst, f)
        ok = True
    finally:  # a barrier on success first, so no rank tears down a peer's connections
        shutdown(synchronize=ok)
