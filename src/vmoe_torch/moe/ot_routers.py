"""The sparsity-constrained optimal-transport routers of the reference's
`projects/sparsity_constrained_ot` (Liu, Puigcerver, Blondel 2022).

Each turns the (G, S, E) router logits into a transport plan per group
(tokens send 1, experts receive S/E; `moe.transport`) and dispatches on the
plan with the plain routers' dispatchers:

| router          | reference class                                   | plan of            |
|-----------------|---------------------------------------------------|--------------------|
| `ot_sparse_ec`  | SparseProjectionTransportTopItemsPerExpertRouter  | softmax, L2        |
| `ot_ksparse_tc` | KSparseProjectionTransportTopExpertsPerItemRouter | softmax, L2, <= K per token |
| `ot_ksparse_ec` | KSparseProjectionTransportTopItemsPerExpertRouter | softmax, L2, <= C per expert |
| `ot_kl_tc`      | KLProjectionNoisyTopExpertsPerItemRouter          | logits, entropic (Sinkhorn or L-BFGS) |
| `ot_kl_ec`      | KLProjectionNoisyTopItemsPerExpertRouter          | logits, entropic (Sinkhorn) |

tc: each token takes its top-K experts on the plan, with capacity and
optionally BPR (priority = the plan's top value), as `top_experts_per_item`;
ec: each expert takes its top-C tokens on the plan, as expert choice. A
selected pair whose plan value is 0 is dispatched all the same (the
dispatcher's own mask, as the reference). Combine weights: the softmax of
the logits at the selected pairs (`ot_softmax_combine`, the reference's
default), else the plan's values.

Noise (training, the KL routers only): N(0, (noise_std / E)^2) on the
logits the plan is computed from. As written in the reference, `ot_kl_tc`
then still combines with the softmax of the clean logits (`ot_kl_ec` with
the noisy ones); the reference also solves the clean problem first and
discards it, which is skipped here (it changes no output).

Metrics, per group (G,), named as the reference's: `auxiliary_loss_per_group`
(importance and load losses of `ot_kl_tc` where their weights are > 0,
else 0), `importance_loss` / `load_loss` (`ot_kl_tc`), the expert-choice
dispatcher's metrics of the plan (ec), the non-zero counts of the plan
(`num_items_per_expert_*`, and `num_experts_per_item_*` for `ot_ksparse_tc`),
and for tc the top-K routing statistics of `routers.routing_stats`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..config.routing import RoutingConfig
from .dispatch import (
    Dispatcher,
    EinsumDispatcher,
    ExpertChoiceDispatcher,
    IndexDispatcher,
    routing_to_dense,
    top_items_to_dense,
)
from .metrics_switch import metrics_enabled
from .routers import Metrics, _GatingRouter, routing_stats
from .routing import (
    TopItemsRouting,
    importance_loss,
    load_loss,
    top_experts_per_item,
    top_items_metrics,
    top_items_per_expert,
)
from .transport import kl_lbfgs_plan, l2_semi_dual_plan, sinkhorn_plan


class _OTRouter(_GatingRouter):
    """Shared by both flavours: the logits, the noise and the plan."""

    def __init__(self, dim: int, num_experts: int, config: RoutingConfig) -> None:
        super().__init__(dim, num_experts, config)
        self.kind = config.router

    def noise_shape(self, groups: int, group_size: int) -> tuple[int, ...]:
        return (groups, group_size, self.num_experts)

    @staticmethod
    def _exclude(plan: Tensor, finite: Tensor) -> Tensor:
        raise NotImplementedError

    def plan(self, sim: Tensor, group_size: int) -> Tensor:
        """(G, S, E) similarity (softmax for the L2 routers, logits for the
        KL ones) -> (G, S, E) transport plan."""
        r = self.config
        gradient = r.effective_ot_gradient
        experts = self.num_experts
        if r.is_entropic:
            if r.ot_lbfgs:
                return kl_lbfgs_plan(sim, r.ot_maxiter, gradient=gradient)
            return sinkhorn_plan(sim, (r.ot_maxiter // 10) * 10, gradient=gradient)
        if r.router == "ot_ksparse_tc":  # tokens are the columns (mass 1), experts the duals
            return l2_semi_dual_plan(sim, 1.0, group_size / experts, r.num_selected_experts,
                                     r.ot_maxiter, r.ot_adam_lr, gradient=gradient)
        k = self.capacity(group_size) if r.router == "ot_ksparse_ec" else None
        plan_t = l2_semi_dual_plan(sim.transpose(1, 2), group_size / experts, 1.0, k,
                                   r.ot_maxiter, r.ot_adam_lr, gradient=gradient)
        return plan_t.transpose(1, 2)

    def solve(self, x: Tensor, noise: Optional[Tensor],
              generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor, Tensor, Metrics]:
        """(G, S, D) -> plan, combine gates, clean logits (each (G, S, E))
        and the loss metrics."""
        r = self.config
        groups, size, _ = x.shape
        logits = self.logits(x)
        # A non-finite token joins its group's problem with zero logits, so that
        # it cannot turn the whole group's plan into NaN (`_exclude` then keeps
        # it out of the other tokens' slots); finite inputs are unchanged.
        finite = torch.isfinite(logits).all(-1, keepdim=True)
        logits = torch.where(finite, logits, torch.zeros_like(logits))
        softmax = torch.softmax(logits, dim=-1)
        if not r.is_entropic:
            return self._exclude(self.plan(softmax, size), finite), softmax, logits, {}
        ot_input, std = logits, r.effective_noise_std / self.num_experts
        noisy = self.training and std > 0
        if noisy:
            ot_input = logits + std * self._draw(noise, self.noise_shape(groups, size), logits, generator)
        plan = self._exclude(self.plan(ot_input, size), finite)
        if r.router == "ot_kl_ec":
            return plan, torch.softmax(ot_input, dim=-1), logits, {}
        zero = logits.new_zeros(groups)
        losses = {"importance_loss": (r.importance_loss_weight, importance_loss(softmax)
                                      if r.importance_loss_weight > 0 else zero)}
        if noisy:
            losses["load_loss"] = (r.load_loss_weight, load_loss(logits, ot_input, std, r.num_selected_experts)
                                   if r.load_loss_weight > 0 else zero)
        metrics: Metrics = {name: value for name, (_, value) in losses.items()}
        aux = zero
        for weight, value in losses.values():
            if weight > 0:
                aux = aux + weight * value
        metrics["auxiliary_loss_per_group"] = aux
        return plan, softmax, logits, metrics


def _nonzero_counts(plan: Tensor, dim: int, name: str) -> Metrics:
    """min / max / avg over the other axis of the plan's non-zeros along `dim`."""
    counts = (plan.detach() != 0).sum(dim)                              # (G, E) or (G, S)
    return {f"{name}_min": counts.min(1).values, f"{name}_max": counts.max(1).values,
            f"{name}_avg": counts.float().mean(1)}


class OTTokensChooseRouter(_OTRouter):
    """`ot_ksparse_tc` and `ot_kl_tc`: top-K experts per token on the plan."""

    @staticmethod
    def _exclude(plan: Tensor, finite: Tensor) -> Tensor:
        """A non-finite token's plan row is NaN: `top_experts_per_item` gives it no slot."""
        return torch.where(finite, plan, torch.full_like(plan, float("nan")))

    def choices(self, group_size: int) -> int:
        return group_size * self.config.num_selected_experts

    def forward(self, x: Tensor, noise: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Dispatcher, Metrics]:
        r = self.config
        groups, size, _ = x.shape
        plan, gates, logits, metrics = self.solve(x, noise, generator)
        capacity = self.capacity(size)
        routing = top_experts_per_item(plan, r.num_selected_experts, capacity, r.batch_priority, r.priority,
                                       generator)
        if r.ot_softmax_combine:
            routing = dataclasses.replace(routing, combine_weights=gates.gather(-1, routing.expert_index))
        if r.router == "ot_ksparse_tc" and metrics_enabled():
            metrics.update(_nonzero_counts(plan, 1, "num_items_per_expert"))
            metrics.update(_nonzero_counts(plan, 2, "num_experts_per_item"))
        metrics.setdefault("auxiliary_loss_per_group", logits.new_zeros(groups))
        if metrics_enabled():
            metrics.update(routing_stats(routing, self.num_experts))
        metrics["capacity"] = torch.tensor(capacity)
        dispatcher: Dispatcher
        if self.dispatch_impl == "einsum":
            ones = dataclasses.replace(routing, combine_weights=torch.ones_like(routing.combine_weights))
            dispatcher = EinsumDispatcher(routing_to_dense(routing, plan), routing_to_dense(ones, plan) > 0)
        else:
            dispatcher = IndexDispatcher(routing)
        return self.wrap(dispatcher), metrics


class OTExpertsChooseRouter(_OTRouter):
    """`ot_sparse_ec`, `ot_ksparse_ec` and `ot_kl_ec`: top-C tokens per
    expert on the plan."""

    @staticmethod
    def _exclude(plan: Tensor, finite: Tensor) -> Tensor:
        """A non-finite token's plan row is -1, below every plan value: it is
        taken only by an expert with more slots than finite tokens."""
        return torch.where(finite, plan, torch.full_like(plan, -1.0))

    def choices(self, group_size: int) -> int:
        return group_size

    def forward(self, x: Tensor, noise: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> tuple[Dispatcher, Metrics]:
        r = self.config
        groups, size, _ = x.shape
        plan, gates, logits, metrics = self.solve(x, noise, generator)
        capacity = self.capacity(size)
        routing = top_items_per_expert(plan, capacity)
        if metrics_enabled():
            metrics.update(top_items_metrics(routing, size))
        if r.ot_softmax_combine:
            weights = gates.transpose(1, 2).gather(-1, routing.item_index)
            routing = TopItemsRouting(item_index=routing.item_index, combine_weights=weights, capacity=capacity)
        if r.router == "ot_ksparse_ec" and metrics_enabled():
            metrics.update(_nonzero_counts(plan, 1, "num_items_per_expert"))
        metrics["auxiliary_loss_per_group"] = logits.new_zeros(groups)
        metrics["capacity"] = torch.tensor(capacity)
        dispatcher: Dispatcher
        if self.dispatch_impl == "einsum":
            ones = TopItemsRouting(routing.item_index, torch.ones_like(routing.combine_weights), capacity)
            dispatcher = EinsumDispatcher(top_items_to_dense(routing, plan), top_items_to_dense(ones, plan) > 0)
        else:
            dispatcher = ExpertChoiceDispatcher(routing, size)
        return self.wrap(dispatcher), metrics


__all__ = ["OTTokensChooseRouter", "OTExpertsChooseRouter"]
