"""Worker of tests/parallel/test_fsdp.py: on every rank, one process's
computation on the whole batch against FSDP2 (+ expert parallelism) on this
rank's share; writes the worst differences and the memory figures as JSON."""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vmoe_torch import create_model
from vmoe_torch.distributed.fsdp import (
    clip_grad_norm_fsdp,
    fsdp_expert_parallel,
    full_state_dict,
    local_bytes,
    parallel_mesh,
    sync_expert_gradients,
    unsharded,
)
from vmoe_torch.distributed.runtime import shutdown


def _model(num_experts: int, dim: int = 32, dropless: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    routing: dict[str, Any] = {"dropless": True} if dropless else {"batch_priority": True, "capacity_factor": 0.5}
    model = create_model("vmoe_mi4_every1_e8_k2", num_layers=2, layers=(0, 1), patch_size=8, image_size=32,
                         hidden_size=dim, mlp_dim=2 * dim, num_heads=2, group_size=2 * 17,
                         num_experts=num_experts, num_selected_experts=2, **routing).train()
    with torch.no_grad():  # a non-zero head, so that every gradient is exercised
        model.head.weight.normal_(std=0.1)
    return model


def _mean(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return float(x) / dist.get_world_size()


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every gradient unsharded, under the unsharded model's names."""
    return dict(unsharded(model, n, p.grad) for n, p in model.named_parameters())


def check(num_experts: int, expert_shards: int, dropless: bool = False, batch: int = 8,
          steps: int = 5) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    full = _model(num_experts, dropless=dropless)
    sharded = copy.deepcopy(full)
    mesh = parallel_mesh(expert_shards)
    fsdp_expert_parallel(sharded, mesh)
    share = slice(rank * batch // world, (rank + 1) * batch // world)
    opt_f = torch.optim.SGD(full.parameters(), lr=0.05, momentum=0.9)
    opt_s = torch.optim.SGD(sharded.parameters(), lr=0.05, momentum=0.9)
    out: dict[str, Any] = {"logits": 0.0, "aux": 0.0, "grads": 0.0, "loss": 0.0}
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 + step)
        x = torch.randn(batch, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        for m in (full, sharded):
            m.set_noise_seed(1000 + step)
        logits, metrics = full(x, return_metrics=True)
        loss = F.cross_entropy(logits, y) + metrics["auxiliary_loss"]
        loss.backward()
        norm_f = torch.nn.utils.clip_grad_norm_(full.parameters(), 1.0)
        logits_s, metrics_s = sharded(x[share], return_metrics=True)
        loss_s = F.cross_entropy(logits_s, y[share]) + metrics_s["auxiliary_loss"]
        loss_s.backward()
        sync_expert_gradients(sharded)
        if step == 0:  # gradients before clipping, against one process
            out["logits"] = float((logits_s - logits[share]).detach().abs().max())
            out["aux"] = abs(_mean(metrics_s["auxiliary_loss"]) - float(metrics["auxiliary_loss"].detach()))
            want = {n: p.grad for n, p in full.named_parameters()}
            got = _grads(sharded)
            # the reference was clipped already: compare against the unclipped copy
            scale = min(1.0, 1.0 / (float(norm_f) + 1e-6))
            out["grads"] = max(float((got[n] * scale - want[n]).abs().max()) for n in want)
        norm_s = clip_grad_norm_fsdp(sharded, 1.0)
        # relative: the reference's norm is float32, ours float64
        out["norm"] = max(out.get("norm", 0.0), abs(float(norm_s) - float(norm_f)) / max(1.0, float(norm_f)))
        opt_f.step(), opt_f.zero_grad()
        opt_s.step(), opt_s.zero_grad()
        out["loss"] = max(out["loss"], abs(_mean(loss_s) - float(loss)))
    state = full_state_dict(sharded)
    out["params"] = max(float((state[k] - v).abs().max()) for k, v in full.state_dict().items())
    params, opt_state = local_bytes(sharded, opt_s)
    total_params, total_state = local_bytes(full, opt_f)
    expert = sum(p.numel() * p.element_size() for n, p in full.named_parameters() if ".experts." in n)
    ep = mesh.size(1)
    out["expected_param_bytes"] = (total_params - expert) / world + (expert / ep if ep > 1 else expert / world)
    out["param_bytes"], out["opt_bytes"], out["total_param_bytes"] = params, opt_state, total_params
    return out


def worker(rank: int, world: int, init_file: str, out_dir: str, cases: list) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ok = False
    try:
        results = {f"E{c[0]}_P{c[1]}" + ("_dropless" if c[2:] and c[2] else ""): check(*c) for c in cases}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        ok = True
    finally:  # a barrier on success first, so no rank tears down a peer's connections
        shutdown(synchronize=ok)
