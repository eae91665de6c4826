"""Routers: (G, S, D) tokens -> (dispatcher, metrics), as the reference's
routers. Each one owns its parameters and its `RoutingConfig`.

- `TopExpertsRouter`: noisy top-K experts per token (the paper's), with
  vanilla or Batch Priority Routing; with `ensemble_size` M > 1 it is the
  E^3 router (each member's tokens routed among its own E/M experts).
- `ExpertChoiceRouter`: each expert takes its top-C tokens.
- `SoftRouter`: Soft MoE; slots are soft mixes of all tokens.

The two sparse routers share their parameter (the gating matrix), so a
model can switch between them at inference; Soft MoE's parameters differ.

Axis legend: see `vmoe_torch.moe.routing` (M: ensemble members).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config.routing import RoutingConfig
from ..layers.init import lecun_normal_
from .capacity import compute_capacity
from .dispatch import (
    Bfloat16Dispatcher,
    Dispatcher,
    DroplessDispatcher,
    EinsumDispatcher,
    ExpertChoiceDispatcher,
    IndexDispatcher,
    SoftDispatcher,
    routing_to_dense,
    top_items_to_dense,
)
from .metrics_switch import metrics_enabled
from .routing import (
    TopExpertsRouting,
    global_entropy_loss,
    gshard_loss,
    importance_loss,
    load_loss,
    local_entropy_loss,
    sorted_top_k,
    top_experts_per_item,
    top_items_metrics,
    top_items_per_expert,
)
from .soft import soft_metrics, soft_num_slots, soft_router_logits, soft_weights

Metrics = dict[str, Tensor]
DISPATCH_IMPLS = ("index", "einsum")


def float32_region(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off (router logits in float32), on device types that
    have autocast; elsewhere (the meta device) nothing to switch off."""
    available = getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))
    if not available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


class Router(nn.Module):
    """Base: holds the config; subclasses implement `forward`."""

    kind = ""

    def __init__(self, num_experts: int, config: RoutingConfig) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.config = config

    def capacity(self, group_size: int) -> int:
        """Buffer rows per expert and group (C; p for Soft MoE)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def noise_shape(self, groups: int, group_size: int) -> tuple[int, ...]:
        """Shape of the standard-normal draw this router adds in training."""
        raise NotImplementedError

    def wrap(self, dispatcher: Dispatcher) -> Dispatcher:
        return Bfloat16Dispatcher(dispatcher) if self.config.effective_bfloat16 else dispatcher

    def forward(self, x: Tensor, noise: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Dispatcher, Metrics]:
        raise NotImplementedError

    def _draw(self, noise: Optional[Tensor], shape: tuple[int, ...], like: Tensor,
              generator: Optional[torch.Generator]) -> Tensor:
        if noise is None:
            return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"Router noise must have shape {tuple(shape)}, got {tuple(noise.shape)}.")
        return noise.to(like)


class _GatingRouter(Router):
    """Shared by the sparse routers: a bias-free (E, D) gating matrix whose
    logits are computed in float32 outside autocast (routing decisions, ties
    and orderings are fragile in bfloat16)."""

    kernel_params = ("weight",)  # the gating matrix is a kernel (weight decay)

    def __init__(self, dim: int, num_experts: int, config: RoutingConfig) -> None:
        super().__init__(num_experts, config)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        self.dispatch_impl = "index"
        # Drawn as nn.Linear's own init, as earlier versions did, so that a
        # seed builds the same model; `reset_parameters` sets flax's default.
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def reset_parameters(self) -> None:
        lecun_normal_(self.weight, self.weight.shape[1])  # flax Dense default

    def logits(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (G, S, E) float32."""
        with float32_region(x.device.type):
            return F.linear(x.float(), self.weight.float())

    def capacity(self, group_size: int) -> int:
        """C: the explicit capacity, else `compute_capacity` of the choices a
        group of `group_size` tokens makes (`choices`)."""
        r = self.config
        if r.capacity is not None:
            return r.capacity
        assert r.capacity_factor is not None
        return compute_capacity(self.choices(group_size), self.num_experts, r.capacity_factor,
                                r.capacity_ceil_or_round, r.capacity_multiple_of)

    def choices(self, group_size: int) -> int:
        """Token-expert assignments a group of `group_size` tokens asks for."""
        raise NotImplementedError

    def take_parameters(self, other: "_GatingRouter") -> None:
        self.weight = other.weight
        self.dispatch_impl = other.dispatch_impl


class TopExpertsRouter(_GatingRouter):
    """Noisy top-K experts per token (reference NoisyTopExpertsPerItemRouter;
    with `ensemble_size` M > 1, NoisyTopExpertsPerItemEnsembleRouter).

    E^3: token j of a group belongs to member j mod M (the model interleaves
    members, see `MoeMlp`), and its gates are a softmax over member
    (j mod M)'s experts m*E/M ... (m+1)*E/M - 1 only; the other gates are
    exactly 0. Top-K, BPR and capacity then run on the whole (G, S, E) gate
    matrix. Losses and noise are per member, on its own (S/M, E/M) gates.
    """

    kind = "top_experts"

    def __init__(self, dim: int, num_experts: int, config: RoutingConfig,
                 ensemble_size: int = 1) -> None:
        super().__init__(dim, num_experts, config)
        if ensemble_size < 1 or num_experts % ensemble_size:
            raise ValueError(f"ensemble_size must be >= 1 and divide num_experts={num_experts}, "
                             f"got {ensemble_size}.")
        self.ensemble_size = ensemble_size
        self.check_k(config)

    def check_k(self, config: RoutingConfig) -> None:
        per_member = self.num_experts // self.ensemble_size
        if config.num_selected_experts > per_member:
            raise ValueError(
                f"num_selected_experts={config.num_selected_experts} exceeds the {per_member} "
                f"experts of each of the {self.ensemble_size} ensemble members: lower K.")

    def choices(self, group_size: int) -> int:
        return group_size * self.config.num_selected_experts  # K per token

    def noise_shape(self, groups: int, group_size: int) -> tuple[int, ...]:
        return (groups, group_size, self.num_experts // self.ensemble_size)

    def _by_member(self, t: Tensor) -> Tensor:
        """(G, S, F) with members interleaved (token j is member j mod M)
        -> (G*M, S/M, F), one row block per member."""
        g, s, _ = t.shape
        m = self.ensemble_size
        return t.reshape(g, s // m, m, -1).transpose(1, 2).reshape(g * m, s // m, -1)

    def _member_logits(self, logits: Tensor) -> Tensor:
        """(G, S, E) logits -> (G*M, S/M, E/M): each token's logits for its
        own member's experts only."""
        g, s, _ = logits.shape
        m = self.ensemble_size
        own = logits.reshape(g, s // m, m, m, -1).diagonal(dim1=2, dim2=3)  # (G, S/M, E/M, M)
        return own.permute(0, 3, 1, 2).reshape(g * m, s // m, -1)

    def _block_diagonal(self, gates: Tensor, groups: int, size: int) -> Tensor:
        """(G*M, S/M, E/M) member gates -> (G, S, E), zero off the member's experts."""
        m = self.ensemble_size
        g4 = gates.view(groups, m, size // m, -1).permute(0, 2, 3, 1)       # (G, S/M, E/M, M)
        full = torch.diag_embed(g4)                                          # (G, S/M, E/M, M, M)
        return full.permute(0, 1, 3, 4, 2).reshape(groups, size, self.num_experts)

    def gates(self, x: Tensor, noise: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None) -> tuple[Tensor, Metrics]:
        """(G, S, D) -> dispatch gates (G, S, E) and the per-group auxiliary
        losses ((G,), or (G, M) for an ensemble)."""
        r = self.config
        groups, size, _ = x.shape
        m = self.ensemble_size
        logits = self.logits(x)                                              # (G, S, E)
        if m > 1:
            logits = self._member_logits(logits)                             # (G*M, S/M, E/M)
        gates = torch.softmax(logits, dim=-1)
        noisy = self.training and r.effective_noise_std > 0
        report = metrics_enabled()  # a loss with weight 0 is only reported
        losses = {}
        if report or r.importance_loss_weight > 0:
            losses["importance_loss"] = (r.importance_loss_weight, importance_loss(gates))
        gates_dispatch = gates
        if noisy:
            std = r.effective_noise_std / (self.num_experts // m)
            draw = self._draw(noise, self.noise_shape(groups, size), logits, generator)
            if m > 1:
                draw = self._by_member(draw)
            noisy_logits = logits + std * draw
            gates_dispatch = torch.softmax(noisy_logits, dim=-1)
            if report or r.load_loss_weight > 0:
                losses["load_loss"] = (r.load_loss_weight, load_loss(
                    logits, noisy_logits, std, r.num_selected_experts))
        if report or r.gshard_loss_weight > 0:
            losses["gshard_loss"] = (r.gshard_loss_weight, gshard_loss(gates_dispatch))
        if r.local_entropy_loss_weight > 0 or r.global_entropy_loss_weight > 0:  # LIMoE's, on the clean gates
            losses["local_entropy_loss"] = (r.local_entropy_loss_weight, local_entropy_loss(gates))
            losses["global_entropy_loss"] = (r.global_entropy_loss_weight, global_entropy_loss(gates))
        metrics: Metrics = {}
        aux = logits.new_zeros(logits.shape[0])
        for name, (weight, value) in losses.items():
            metrics[name] = value
            if weight > 0:
                aux = aux + weight * value
        metrics["auxiliary_loss_per_group"] = aux
        if m > 1:
            metrics = {k: v.view(groups, m) for k, v in metrics.items()}
            gates_dispatch = self._block_diagonal(gates_dispatch, groups, size)
        return gates_dispatch, metrics

    def forward(self, x: Tensor, noise: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Dispatcher, Metrics]:
        r = self.config
        gates, metrics = self.gates(x, noise, generator)
        if r.dropless:
            return self._dropless(gates, metrics)
        capacity = self.capacity(x.shape[1])
        plan = top_experts_per_item(gates, r.num_selected_experts, capacity,
                                    r.batch_priority, r.priority, generator)
        dispatcher: Dispatcher
        if self.dispatch_impl == "einsum":
            dispatcher = EinsumDispatcher(routing_to_dense(plan, gates))
        else:
            dispatcher = IndexDispatcher(plan)
        if metrics_enabled():
            metrics.update(routing_stats(plan, self.num_experts))
        metrics["capacity"] = torch.tensor(capacity)
        return self.wrap(dispatcher), metrics

    def _dropless(self, gates: Tensor, metrics: Metrics) -> tuple[Dispatcher, Metrics]:
        """Every top-K choice kept. The plan (for routing_stats) keeps every
        choice in a one-slot buffer; the `capacity` metric is the fullest
        expert's row count."""
        groups, size, _ = gates.shape
        k = self.config.num_selected_experts
        top_gates, expert_index = sorted_top_k(gates, k)
        plan = TopExpertsRouting(expert_index=expert_index, buffer_index=torch.zeros_like(expert_index),
                                 combine_weights=top_gates, capacity=1, num_experts=self.num_experts)
        if metrics_enabled():
            metrics.update(routing_stats(plan, self.num_experts))
            metrics["capacity"] = (metrics["expert_load"] * (size * k)).amax().round().long()  # fullest buffer
        return self.wrap(DroplessDispatcher(expert_index, top_gates, self.num_experts)), metrics


class ExpertChoiceRouter(_GatingRouter):
    """Each expert takes the C tokens with its largest gates (reference
    NoisyTopItemsPerExpertRouter); no auxiliary loss."""

    kind = "expert_choice"

    def choices(self, group_size: int) -> int:
        return group_size  # C = capacity_factor * S / E

    def noise_shape(self, groups: int, group_size: int) -> tuple[int, ...]:
        return (groups, group_size, self.num_experts)

    def forward(self, x: Tensor, noise: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Dispatcher, Metrics]:
        r = self.config
        groups, size, _ = x.shape
        logits = self.logits(x)
        if self.training and r.effective_noise_std > 0:
            draw = self._draw(noise, self.noise_shape(groups, size), logits, generator)
            logits = logits + (r.effective_noise_std / self.num_experts) * draw
        capacity = self.capacity(size)
        gates = torch.softmax(logits, dim=-1)
        plan = top_items_per_expert(gates, capacity)
        metrics = top_items_metrics(plan, size) if metrics_enabled() else {}
        metrics["auxiliary_loss_per_group"] = logits.new_zeros(groups)
        metrics["capacity"] = torch.tensor(capacity)
        dispatcher: Dispatcher
        if self.dispatch_impl == "einsum":
            dispatcher = EinsumDispatcher(top_items_to_dense(plan, gates))
        else:
            dispatcher = ExpertChoiceDispatcher(plan, size)
        return self.wrap(dispatcher), metrics


class SoftRouter(Router):
    """Soft MoE (reference `soft_moe.router.SoftRouter`).

    Parameters: `mu (D, E, p)` (one D-vector per slot) and the scalar
    `scale`. The slot count p is fixed at construction from `num_slots`, or
    from the group size and capacity factor; every routing group, including
    a smaller remainder group, uses the same p slots. Nothing is dropped and
    there is no auxiliary loss; tokens and expert outputs are rounded to
    bfloat16 around the experts unless `bfloat16_dispatch=False`.
    """

    kind = "soft"

    def __init__(self, dim: int, num_experts: int, config: RoutingConfig,
                 group_size: Optional[int]) -> None:
        super().__init__(num_experts, config)
        self.num_slots = self.slots_for(config, group_size, num_experts)
        self.mu = nn.Parameter(torch.empty(dim, num_experts, self.num_slots))
        self.scale = nn.Parameter(torch.ones(()))

    def reset_parameters(self) -> None:
        # Only mu's direction matters (it is normalised); the scale starts at 1 (reference).
        lecun_normal_(self.mu, self.mu.shape[0])
        with torch.no_grad():
            self.scale.fill_(1.0)

    @staticmethod
    def slots_for(config: RoutingConfig, group_size: Optional[int], num_experts: int) -> int:
        """p from `num_slots`, or from the group size and capacity factor."""
        if config.num_slots is None and group_size is None:
            raise ValueError("Soft MoE needs its slot count at construction: set num_slots, or "
                             "group_size with capacity_factor.")
        return soft_num_slots(group_size or 0, num_experts, config.capacity_factor, config.num_slots)

    def capacity(self, group_size: int) -> int:
        return self.num_slots

    def noise_shape(self, groups: int, group_size: int) -> tuple[int, ...]:
        return (groups, group_size, self.num_experts, self.num_slots)

    def forward(self, x: Tensor, noise: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Dispatcher, Metrics]:
        groups, size, _ = x.shape
        # Logits and both softmaxes in float32 outside autocast, as the sparse routers.
        with float32_region(x.device.type):
            logits, mu = soft_router_logits(x.float(), self.mu.float(), self.scale.float())
        std = self.config.effective_noise_std
        if self.training and std > 0:
            logits = logits + std * self._draw(noise, self.noise_shape(groups, size), logits, generator)
        dispatch, combine = soft_weights(logits)
        metrics = soft_metrics(dispatch, combine, mu) if metrics_enabled() else {}
        metrics["auxiliary_loss_per_group"] = logits.new_zeros(groups)
        metrics["capacity"] = torch.tensor(self.num_slots)
        return self.wrap(SoftDispatcher(dispatch, combine)), metrics


@torch.no_grad()
def routing_stats(plan: TopExpertsRouting, num_experts: int) -> Metrics:
    """Per-group (G,) statistics of a top-K routing plan (detached)."""
    kept = plan.kept                                                    # (G, S, K)
    groups, size, k = kept.shape
    load = torch.zeros(groups, num_experts, device=kept.device)
    load.scatter_add_(1, plan.expert_index.reshape(groups, -1),
                      torch.ones(groups, size * k, device=kept.device))
    top = plan.combine_weights[..., 0].float()
    return {
        "dropped_fraction": 1.0 - kept.float().mean(dim=(1, 2)),
        "no_expert_fraction": (~kept.any(-1)).float().mean(1),
        "expert_load": load / (size * k),
        "top_gate_mean": top.mean(1),
        "top_gate_min": top.min(1).values,
    }
