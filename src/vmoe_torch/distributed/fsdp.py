"""FSDP2 with expert parallelism on a 2-D device mesh (data × expert).

The W ranks form a mesh ("dp", "ep") of shape (W / P, P):

- every rank is a data-parallel worker: it takes its own share of the batch,
  and its routing groups keep their global indices (router noise does not
  depend on W, as in `expert_parallel`);
- non-expert parameters (attention, norms, routers, head) are sharded with
  FSDP2 (`fully_shard`) over all W ranks: each rank stores 1/W of them and of
  their optimiser state, and their gradients are averaged by FSDP's
  reduce-scatter;
- with P > 1, each MoE layer's experts are sharded over the "ep" ranks (P
  must divide E; tokens are exchanged with all_to_all inside the "ep" group)
  and replicated over the W / P "dp" replicas, whose expert gradients are
  summed with an all_reduce over "dp" only (the ranks that hold the same
  experts), then divided by W. So W may exceed E (E = 2 on 4 ranks: a 2 × 2
  mesh);
- with P = 1 (data parallel only) the experts are ordinary parameters and
  FSDP shards them too.

Together the gradient is that of the mean of the per-rank losses, i.e. of
the global-batch loss, as on one process (tested for W = 2 and 4).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..moe.layer import MoeMlp
from .expert_parallel import ShardedExperts, global_name, is_expert_param


def parallel_mesh(expert_shards: int, device_type: str = "cpu") -> DeviceMesh:
    """The ("dp", "ep") mesh of all ranks with `expert_shards` ranks per
    expert group; raises naming the valid choices when it does not divide W."""
    world = dist.get_world_size()
    if expert_shards < 1 or world % expert_shards:
        valid = [p for p in range(1, world + 1) if world % p == 0]
        raise ValueError(f"expert_shards={expert_shards} must divide the world size {world}; valid: {valid}.")
    return init_device_mesh(device_type, (world // expert_shards, expert_shards), mesh_dim_names=("dp", "ep"))


def fsdp_expert_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shards `model` in place over `mesh` (see the module docstring); each
    transformer block and then the root become FSDP2 units."""
    world, ep = dist.get_world_size(), mesh.size(1)
    layers = [m for m in model.modules() if isinstance(m, MoeMlp)]
    for layer in layers:
        if ep > 1:
            if layer.num_experts % ep:
                valid = [p for p in range(1, layer.num_experts + 1) if layer.num_experts % p == 0]
                raise ValueError(f"{ep} expert shards must divide the {layer.num_experts} experts of every MoE "
                                 f"layer; valid: {valid}.")
            layer.experts = ShardedExperts(layer.experts, mesh.get_group("ep"))  # type: ignore[assignment]
        layer.noise.shard = dist.get_rank()  # this rank's data share: its groups' global indices
    flat = init_device_mesh(mesh.device_type, (world,), mesh_dim_names=("fsdp",))
    experts = {p for n, p in model.named_parameters() if is_expert_param(n)}
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=flat, ignored_params={p for p in block.parameters() if p in experts})
    fully_shard(model, mesh=flat, ignored_params=experts)
    model._vmoe_mesh = mesh  # type: ignore[assignment]
    return model


def _mesh(model: nn.Module) -> DeviceMesh:
    mesh = getattr(model, "_vmoe_mesh", None)
    if mesh is None:
        raise ValueError("The model was not sharded with fsdp_expert_parallel.")
    return mesh


@torch.no_grad()
def sync_expert_gradients(model: nn.Module) -> None:
    """After backward: expert gradients summed over the "dp" replicas and
    divided by W (FSDP has already averaged every other gradient)."""
    mesh, world = _mesh(model), dist.get_world_size()
    grads = [p.grad for n, p in model.named_parameters() if is_expert_param(n) and p.grad is not None]
    if not grads:
        return
    if mesh.size(0) > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=mesh.get_group("dp"))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for g in grads:
        g.div_(world)


@torch.no_grad()
def clip_grad_norm_fsdp(model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
    """Global-norm clipping over the sharded model (after
    `sync_expert_gradients`): each FSDP shard counts once, each expert once.
    Returns the norm before clipping (0-dim float64); no host sync."""
    mesh = _mesh(model)
    grads, is_expert = [], []
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad
            grads.append(g.to_local() if isinstance(g, DTensor) else g)
            is_expert.append(is_expert_param(name))
    device = grads[0].device if grads else torch.device("cpu")
    sharded = torch.zeros((), dtype=torch.float64, device=device)  # summed where the gradients live
    experts = torch.zeros((), dtype=torch.float64, device=device)
    for g, expert in zip(grads, is_expert):
        if expert:
            experts += g.double().square().sum()
        else:
            sharded += g.double().square().sum()
    dist.all_reduce(sharded)                           # shards are disjoint over all W ranks
    if mesh.size(1) > 1:
        dist.all_reduce(experts, group=mesh.get_group("ep"))  # each expert lives on one rank of its ep group
    total = (sharded + experts).sqrt()
    if max_norm is not None:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(device=g.device, dtype=g.dtype))
    return total


def _gather_experts(mesh: DeviceMesh, value: torch.Tensor) -> torch.Tensor:
    """This rank's expert slice -> all E experts (all_gather over "ep")."""
    if mesh.size(1) == 1:
        return value
    parts = [torch.empty_like(value) for _ in range(mesh.size(1))]
    dist.all_gather(parts, value.contiguous(), group=mesh.get_group("ep"))
    return torch.cat(parts)


@torch.no_grad()
def unsharded(model: nn.Module, name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(name in the unsharded model, full tensor) of one entry of the sharded
    model's state (or of a gradient under its parameter's name): an FSDP
    shard all-gathered, an expert slice gathered over its "ep" group. A
    collective call: every rank calls it for the same names."""
    if isinstance(value, DTensor):
        return name, value.full_tensor()
    if not is_expert_param(name):
        return name, value
    return global_name(name), _gather_experts(_mesh(model), value)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded single-process state_dict, on every rank, names as in
    the unsharded model. For tests and small models: it materialises the
    whole state on every rank."""
    return dict(unsharded(model, name, value) for name, value in model.state_dict().items())


def local_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[int, int]:
    """(parameter bytes, optimiser-state bytes) held by this rank."""
    def size(t: torch.Tensor) -> int:
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    params = sum(size(p) for p in model.parameters())
    state = 0
    if optimizer is not None:
        for s in optimizer.state.values():
            state += sum(size(v) for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return params, state
