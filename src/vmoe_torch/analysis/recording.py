"""Recording routing plans for analysis, with forward hooks on the routers:
the MoE layer itself keeps no analysis state."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

Plan = dict[str, torch.Tensor]


def _plan_of(output: Any) -> Any:
    dispatcher = output[0]
    return getattr(getattr(dispatcher, "inner", dispatcher), "plan", None)


@contextlib.contextmanager
def record_routing(model: Any) -> Iterator[dict[str, list[Plan]]]:
    """Within the block, every routed run of every top-K router of `model`
    (a `VisionTransformerMoe`; the routers in place on entry) appends its detached plan to
    `recorded[layer name]`: expert_index, buffer_index, top gates and
    capacity, on the CPU (see `vmoe_torch.analysis.stats`). Routers without
    a per-token plan (expert choice, Soft MoE) record nothing."""
    recorded: dict[str, list[Plan]] = {}
    handles = []

    def hook_for(runs: list[Plan]):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:  # noqa: ARG001
            plan = _plan_of(output)
            if plan is not None:
                runs.append({"expert_index": plan.expert_index.detach().cpu(),
                             "buffer_index": plan.buffer_index.detach().cpu(),
                             "gates": plan.combine_weights.detach().float().cpu(),
                             "capacity": torch.tensor(plan.capacity)})
        return hook

    try:
        for name, layer in model.moe_layers().items():
            recorded[name] = []
            handles.append(layer.router.register_forward_hook(hook_for(recorded[name])))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
