"""`MoeMlp`: router -> dispatch -> experts -> combine (reference MlpMoeBlock).

Axis legend: see `vmoe_torch.moe.routing`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.init import lecun_normal_
from .capacity import compute_capacity
from .config import RoutingConfig
from .dispatch import EinsumDispatcher, ExpertChoiceDispatcher, IndexDispatcher, routing_to_dense
from .experts import Experts
from .routing import (gshard_loss, importance_loss, load_loss, top_experts_per_item,
                      top_items_metrics, top_items_per_expert)

Metrics = dict[str, Tensor]


def split_into_groups(num_tokens: int, group_size: Optional[int]) -> list[tuple[int, int, int]]:
    """How B*N tokens are cut into routing groups.

    The tokens are taken in order (image 0's tokens, then image 1's, ...) and
    cut into consecutive groups of `group_size`; a group may span images.
    When `group_size` does not divide the token count, the full groups are
    routed as usual and the remaining tokens form ONE smaller last group whose
    capacity follows the same formula with its own size. `group_size=None`
    routes all tokens as one group.

    Returns:
      A list of (start, num_groups, size) runs: tokens [start, start +
      num_groups*size) form `num_groups` groups of `size`.
    """
    if num_tokens < 1:
        raise ValueError("An MoE layer needs at least one token.")
    size = num_tokens if group_size is None else group_size
    if size < 1:
        raise ValueError(f"group_size must be >= 1 token, got {group_size}.")
    full, rest = divmod(num_tokens, size)
    runs = []
    if full:
        runs.append((0, full, size))
    if rest:
        runs.append((full * size, 1, rest))
    return runs


class MoeMlp(nn.Module):
    """Sparse mixture of E expert MLPs with a noisy top-K router.

    `forward(x)` takes (B, N, D) and returns `(y, metrics)`: y (B, N, D) is
    the MoE output WITHOUT the residual (like the reference's MlpMoeBlock);
    `metrics["auxiliary_loss"]` is a 0-dim tensor, the weighted auxiliary loss
    averaged over groups. The other metrics are documented in docs/usage.md.

    Args:
      dim: D. mlp_dim: hidden size H of each expert. num_experts: E.
      group_size: tokens per routing group (None: the whole batch is one group).
      dropout_rate: dropout inside the experts.
      **routing: any `RoutingConfig` field (num_selected_experts,
        capacity_factor, capacity, batch_priority, noise_std, ...).
    """

    def __init__(self, dim: int, mlp_dim: int, num_experts: int,
                 num_selected_experts: int = 1, capacity_factor: Optional[float] = 1.05,
                 group_size: Optional[int] = None, batch_priority: bool = False,
                 noise_std: float = 1.0, dropout_rate: float = 0.0,
                 **routing: Any) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
        if group_size is not None and group_size < 1:
            raise ValueError(f"group_size must be >= 1 token, got {group_size}.")
        if routing.get("capacity") is not None and "capacity_factor" not in routing:
            capacity_factor = None
        self.dim, self.num_experts, self.group_size = dim, num_experts, group_size
        self.routing = self._checked(RoutingConfig(), dict(
            num_selected_experts=num_selected_experts, capacity_factor=capacity_factor,
            batch_priority=batch_priority, noise_std=noise_std, **routing))
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = Experts(num_experts, dim, mlp_dim, dropout_rate)
        self.generator: Optional[torch.Generator] = None
        # "index" (gather/gather, the fast path) or "einsum" (the reference's
        # dense (G, S, E, C) dispatch, kept for comparison and debugging).
        self.dispatch_impl = "index"
        # Analysis hook: when a list, each routed run appends its (detached)
        # routing plan: expert_index, buffer_index, top gates, capacity.
        self.recorded: Optional[list[dict[str, Tensor]]] = None
        # Per-group router noise: when `noise_seed` is set, group g's draw is
        # seeded by (noise_seed, global index of g). With expert parallelism,
        # `rank` shifts the global index by rank * (groups per rank), so the
        # noise does not depend on the number of processes.
        self.noise_seed: Optional[int] = None
        self.rank = 0
        lecun_normal_(self.router.weight, dim)  # flax Dense default

    def _checked(self, base: RoutingConfig, changes: dict[str, Any]) -> RoutingConfig:
        fields = {f.name for f in dataclasses.fields(RoutingConfig)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ValueError(f"Unknown routing setting(s) {unknown}; valid: {sorted(fields)}.")
        if changes.get("capacity") is not None and "capacity_factor" not in changes:
            changes["capacity_factor"] = None
        if changes.get("capacity_factor") is not None and "capacity" not in changes:
            changes["capacity"] = None
        cfg = dataclasses.replace(base, **changes)
        cfg.validate(self.num_experts)
        return cfg

    def set_routing(self, **changes: Any) -> None:
        """Changes routing settings in place (K, capacity, BPR, ...)."""
        self.routing = self._checked(self.routing, changes)

    def capacity_for(self, group_size: int) -> int:
        """C for a group of `group_size` tokens under the current settings."""
        r = self.routing
        if r.capacity is not None:
            return r.capacity
        k = 1 if r.router == "expert_choice" else r.num_selected_experts
        return compute_capacity(group_size * k, self.num_experts, r.capacity_factor,
                                r.capacity_ceil_or_round, r.capacity_multiple_of)

    def router_logits(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (G, S, E) in float32, outside autocast: routing
        decisions (ties, orderings) are fragile in bfloat16."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: Tensor, noise: Optional[Tensor] = None) -> tuple[Tensor, Metrics]:
        """(B, N, D) -> ((B, N, D), metrics).

        Args:
          noise: optional (G_total, S, E) standard-normal draw for the router
            in training mode, one row block per routing group (see
            `split_into_groups`); a smaller last group reads the first rows
            of its block. Without it the draw comes from `self.generator` or
            torch's global RNG.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"MoeMlp expects (B, N, {self.dim}), got {tuple(x.shape)}.")
        batch, seq, dim = x.shape
        tokens = x.reshape(batch * seq, dim)
        outs: list[Tensor] = []
        per_run: list[Metrics] = []
        runs = split_into_groups(batch * seq, self.group_size)
        g_seen = self.rank * sum(groups for _, groups, _ in runs)
        for start, groups, size in runs:
            xg = tokens[start:start + groups * size].view(groups, size, dim)
            run_noise = None
            if noise is not None:
                run_noise = noise[g_seen:g_seen + groups, :size]
            elif self.training and self.noise_seed is not None:
                run_noise = self.group_noise(g_seen, groups, size, x.device)
            y, m = self._route_groups(xg, run_noise)
            outs.append(y.reshape(groups * size, dim))
            per_run.append(m)
            g_seen += groups
        y = outs[0] if len(outs) == 1 else torch.cat(outs)
        return y.view(batch, seq, dim), _merge_runs(per_run)

    def group_noise(self, first_group: int, groups: int, size: int, device) -> Tensor:
        """(groups, size, E) standard-normal draws, one seeded stream per global group."""
        draws = [torch.randn(size, self.num_experts, generator=torch.Generator().manual_seed(
            self.noise_seed * 1_000_003 + first_group + g)) for g in range(groups)]
        return torch.stack(draws).to(device)

    def _route_groups(self, x: Tensor, noise: Optional[Tensor]) -> tuple[Tensor, Metrics]:
        r = self.routing
        groups, size, _ = x.shape
        if r.ablate:
            zero = x.new_zeros(groups)
            return torch.zeros_like(x), {"auxiliary_loss_per_group": zero}
        logits = self.router_logits(x)                                 # (G, S, E)
        gates = torch.softmax(logits, dim=-1)
        metrics: Metrics = {}
        noisy = self.training and r.noise_std > 0
        if noisy:
            std = r.noise_std / self.num_experts
            if noise is None:
                noise = torch.randn(logits.shape, generator=self.generator,
                                    device=logits.device, dtype=logits.dtype)
            elif noise.shape != logits.shape:
                raise ValueError(f"Router noise must have shape {tuple(logits.shape)}, "
                                 f"got {tuple(noise.shape)}.")
            noisy_logits = logits + std * noise.to(logits)
            gates_dispatch = torch.softmax(noisy_logits, dim=-1)
        else:
            gates_dispatch = gates
        capacity = self.capacity_for(size)
        if r.router == "expert_choice":
            routing = top_items_per_expert(gates_dispatch, capacity)
            dispatcher = ExpertChoiceDispatcher(routing, size, r.bfloat16_dispatch)
            metrics.update(top_items_metrics(routing, size))
            metrics["auxiliary_loss_per_group"] = x.new_zeros(groups, dtype=torch.float32)
        else:
            routing = top_experts_per_item(gates_dispatch, r.num_selected_experts, capacity,
                                           r.batch_priority, r.priority, self.generator)
            if self.dispatch_impl == "einsum":
                dispatcher = EinsumDispatcher(routing_to_dense(routing, gates_dispatch),
                                              bfloat16=r.bfloat16_dispatch)
            else:
                dispatcher = IndexDispatcher(routing, r.bfloat16_dispatch)
            losses = {"importance_loss": (r.importance_loss_weight, importance_loss(gates)),
                      "gshard_loss": (r.gshard_loss_weight, gshard_loss(gates_dispatch))}
            if noisy:
                losses["load_loss"] = (r.load_loss_weight, load_loss(
                    logits, noisy_logits, r.noise_std / self.num_experts, r.num_selected_experts))
            aux = x.new_zeros(groups, dtype=torch.float32)
            for name, (weight, value) in losses.items():
                metrics[name] = value
                if weight > 0:
                    aux = aux + weight * value
            metrics["auxiliary_loss_per_group"] = aux
            metrics.update(_routing_stats(routing, self.num_experts))
            if self.recorded is not None:
                self.recorded.append({"expert_index": routing.expert_index.detach().cpu(),
                                      "buffer_index": routing.buffer_index.detach().cpu(),
                                      "gates": routing.combine_weights.detach().float().cpu(),
                                      "capacity": torch.tensor(capacity)})
        metrics["capacity"] = torch.tensor(capacity)
        y = dispatcher.combine(self.experts(dispatcher.dispatch(x)))
        return y.to(x.dtype), metrics


@torch.no_grad()
def _routing_stats(routing, num_experts: int) -> Metrics:
    """Per-group (G,) statistics of a top-K routing plan (detached)."""
    kept = routing.kept                                                  # (G, S, K)
    groups, size, k = kept.shape
    load = torch.zeros(groups, num_experts, device=kept.device)
    load.scatter_add_(1, routing.expert_index.reshape(groups, -1),
                      torch.ones(groups, size * k, device=kept.device))
    top = routing.combine_weights[..., 0].float()
    return {
        "dropped_fraction": 1.0 - kept.float().mean(dim=(1, 2)),
        "no_expert_fraction": (~kept.any(-1)).float().mean(1),
        "expert_load": load / (size * k),
        "top_gate_mean": top.mean(1),
        "top_gate_min": top.min(1).values,
    }


def _merge_runs(runs: list[Metrics]) -> Metrics:
    """Concatenates per-group metrics of the full groups and the remainder
    group; `auxiliary_loss` is the mean over ALL groups."""
    merged: Metrics = {}
    for key in runs[0]:
        values = [m[key] for m in runs if key in m]
        if key == "capacity":
            merged[key] = values[0] if len(values) == 1 else torch.stack(values).max()
        else:
            merged[key] = values[0] if len(values) == 1 else torch.cat(values)
    merged["auxiliary_loss"] = merged["auxiliary_loss_per_group"].mean()
    return merged
