"""Process-group set-up under torchrun, and sharded optimizer state."""
from __future__ import annotations

import os
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


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
