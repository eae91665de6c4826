"""Process-group set-up under torchrun, and sharded optimizer state."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import is_expert_param


def init_from_env(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) initialises the
    default process group: gloo on the CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank = int(os.environ["RANK"])
        # After a torchrun restart, the store still holds the failed attempt's
        # keys (e.g. gloo peer addresses); a per-attempt prefix keeps the new
        # workers from trying to connect to dead processes.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                              else rank == 0, timeout=timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore(f"vmoe/attempt{attempt}", store),
                                rank=rank, world_size=world, timeout=timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size()


def shutdown(synchronize: bool = False) -> None:
    """Destroys the default process group, if any. A process that exits with
    a live gloo group can abort at interpreter shutdown ("terminate called
    without an active exception": the group's threads are still joinable when
    they are destroyed), so every torchrun entry point ends with this. With
    `synchronize` (the success path) the ranks first meet at a barrier, so no
    rank tears its connections down while a peer is still using them."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def expert_param_indices(opt: torch.optim.Optimizer, model: nn.Module) -> set[int]:
    """Indices (in the optimizer's state_dict numbering: param groups in
    order) of the sharded expert parameters."""
    experts = {id(p) for n, p in model.named_parameters() if is_expert_param(n)}
    ordered = [p for group in opt.param_groups for p in group["params"]]
    return {i for i, p in enumerate(ordered) if id(p) in experts}


@torch.no_grad()
def gather_optimizer_state(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """Optimizer state with expert-parameter tensors gathered along the expert axis."""
    sd = opt.state_dict()
    experts = expert_param_indices(opt, model)
    world = dist.get_world_size()
    state = {}
    for idx, s in sd["state"].items():
        out = {}
        for key, value in s.items():
            if idx in experts and torch.is_tensor(value) and value.dim() > 0:
                parts = [torch.empty_like(value) for _ in range(world)]
                dist.all_gather(parts, value.contiguous())
                value = torch.cat(parts)
            out[key] = value
        state[idx] = out
    return {"state": state, "param_groups": sd["param_groups"]}


def shard_optimizer_state(sd: dict[str, Any], opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """Slices a full optimizer state for this rank's experts."""
    experts = expert_param_indices(opt, model)
    rank, world = dist.get_rank(), dist.get_world_size()
    state = {}
    for idx, s in sd["state"].items():
        out = {}
        for key, value in s.items():
            if int(idx) in experts and torch.is_tensor(value) and value.dim() > 0:
                per = value.shape[0] // world
                value = value[rank * per:(rank + 1) * per].clone()
            out[key] = value
        state[int(idx)] = out
    return {"state": state, "param_groups": sd["param_groups"]}
