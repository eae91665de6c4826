"""A sharded run's train state under global names and shapes, for the
sharded checkpoint files (`vmoe_torch.storage.sharded`).

A sharded model's state_dict mixes FSDP2 DTensors (global shape, sharded)
with, under expert parallelism, each rank's E/P experts as plain tensors
under local names ("blocks.1.mlp.experts.local.w1"). Here every entry is
presented as the unsharded model names it, with its global shape: local
experts become DTensors over their expert mesh (Shard(0) over "ep",
Replicate() over "dp"), sharing storage with the live parameters. So DCP
writes each shard once, from a rank that holds it, and a checkpoint loads in
place into any mesh, any world size, or a single process.

Keys: "model/<name>", "optim/<parameter name>/<state key>", "rng/torch".
Non-tensor optimizer state and the param groups (hyper-parameters, and
parameter names instead of indices) are returned as JSON-able metadata.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from ..storage.sharded import MODEL, OPTIM, Spec
from .expert_parallel import global_name, is_expert_param


def _expert_layout(model: nn.Module, device: torch.device) -> tuple[DeviceMesh, list[Placement]]:
    """The mesh and placements of this model's expert-parallel shards."""
    mesh = getattr(model, "_vmoe_mesh", None)  # FSDP2 + EP: ("dp", "ep")
    if mesh is not None:
        return mesh, [Replicate(), Shard(0)]
    flat = getattr(model, "_vmoe_expert_mesh", None)  # expert parallel over all ranks
    if flat is None:
        flat = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("ep",))
        model._vmoe_expert_mesh = flat  # type: ignore[assignment]
    return flat, [Shard(0)]


def as_global(model: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """`value` (an entry of parameter or buffer `name`, or a state of the
    same shape) as a tensor of the unsharded model: local experts wrapped as
    a DTensor sharing `value`'s storage; anything else unchanged."""
    if not is_expert_param(name):
        return value
    mesh, placements = _expert_layout(model, value.device)
    return DTensor.from_local(value, mesh, placements, run_check=False)


def model_entries(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"model/<global name>": tensor} over the model's state_dict (the live
    storage: loading into these loads the model)."""
    return {MODEL + global_name(n): as_global(model, n, v) for n, v in model.state_dict().items()}


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_entries(opt: torch.optim.Optimizer, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """({"optim/<parameter>/<key>": tensor}, {"param_groups", "scalars"})."""
    names = _parameter_names(model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    groups = []
    for group in opt.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [global_name(names[id(p)]) for p in group["params"]]})
        for p in group["params"]:
            name = names[id(p)]
            for key, value in opt.state.get(p, {}).items():
                entry = f"{OPTIM}{global_name(name)}/{key}"
                if torch.is_tensor(value):
                    tensors[entry] = as_global(model, name, value) if value.dim() else value
                else:
                    scalars[entry] = value
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_templates(opt: torch.optim.Optimizer, model: nn.Module,
                        specs: Mapping[str, Spec]) -> dict[str, torch.Tensor]:
    """Empty tensors, sharded like their parameters, for every "optim/" entry
    of `specs` (a checkpoint's names, global shapes and dtypes): what a
    checkpoint's optimizer state is loaded into."""
    params = {global_name(n): (n, p) for n, p in model.named_parameters()}
    out = {}
    for key, (shape, dtype) in specs.items():
        if not key.startswith(OPTIM):
            continue
        pname, _ = _split_optim_key(key)
        if pname not in params:
            raise ValueError(f"The checkpoint has optimizer state for {pname!r}, which is not a parameter "
                             "of this model.")
        name, p = params[pname]
        like = as_global(model, name, p.detach())
        if tuple(shape) == tuple(like.shape):  # a per-element state: sharded as its parameter
            out[key] = as_global(model, name, torch.zeros_like(p.detach(), dtype=dtype))
        else:  # a scalar (Adam's step)
            out[key] = torch.zeros(shape, dtype=dtype)
    return out


def _split_optim_key(key: str) -> tuple[str, str]:
    """"optim/<parameter name>/<state key>" -> (parameter name, state key)."""
    pname, skey = key[len(OPTIM):].rsplit("/", 1)
    return pname, skey


def load_optimizer(opt: torch.optim.Optimizer, model: nn.Module, tensors: Mapping[str, torch.Tensor],
                   meta: Mapping[str, Any]) -> None:
    """Loads {"optim/..." tensors (from `optimizer_templates`)} and the
    metadata of `optimizer_entries` into `opt`."""
    names = _parameter_names(model)
    own_groups = [[global_name(names[id(p)]) for p in g["params"]] for g in opt.param_groups]
    saved_groups = [list(g["params"]) for g in meta["param_groups"]]
    if own_groups != saved_groups:
        raise ValueError("The checkpoint's optimizer was built over other parameters than this run's "
                         "(finetune.freeze or the model changed?); start a new work dir.")
    index = {name: i for i, name in enumerate(n for g in own_groups for n in g)}
    local = {global_name(n): n for n in names.values()}
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pname, skey = _split_optim_key(key)
        if isinstance(value, DTensor) and is_expert_param(local[pname]):
            value = value.to_local()  # the optimizer holds the local experts' state
        state.setdefault(index[pname], {})[skey] = value
    groups = [{**{k: tuple(v) if isinstance(own.get(k), tuple) and isinstance(v, list) else v  # JSON: betas
                  for k, v in g.items()}, "params": [index[n] for n in g["params"]]}
              for g, own in zip(meta["param_groups"], opt.param_groups)]
    opt.load_state_dict({"state": state, "param_groups": groups})


@torch.no_grad()
def copy_full(templates: Mapping[str, torch.Tensor], full: Mapping[str, torch.Tensor]) -> None:
    """Copies full (unsharded) tensors into `templates`: each rank keeps its
    own slice of a sharded template, computed locally (no communication)."""
    for key, target in templates.items():
        source = full[key]
        if isinstance(target, DTensor):
            piece = distribute_tensor(source.to(target.device), target.device_mesh, target.placements,
                                      src_data_rank=None)
            target.to_local().copy_(piece.to_local())
        else:
            target.copy_(source)
