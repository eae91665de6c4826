"""Dispatchers: move tokens (G, S, D) into expert buffers (E, G*C, D) and
combine expert outputs back (reference `BaseDispatcher` contract). Every
router returns one of these; `MoeMlp` only ever calls `dispatch` and
`combine`.

The fast path (`IndexDispatcher`, `ExpertChoiceDispatcher`) builds a
token<->slot plan once per layer and uses index gathers only. The einsum
path (`EinsumDispatcher`, `dense_combine_weights`) materialises the
(G, S, E, C) tensors the reference uses; it exists as a readable reference
and for tests, not for training.

Buffer layout: row `g*C + c` of expert `e` holds group g's slot c.
Axis legend: see `vmoe_torch.moe.routing`.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .gather import paired_gather
from .routing import TopExpertsRouting, TopItemsRouting, top_experts_per_item


class Dispatcher(Protocol):
    """What a router hands to the experts (reference `BaseDispatcher`)."""

    def dispatch(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (E, G*C, D) expert buffers."""
        ...

    def combine(self, y: Tensor) -> Tensor:
        """(E, G*C, D) expert outputs -> (G, S, D)."""
        ...


def round_to_bfloat16(x: Tensor) -> Tensor:
    """Rounds float values to bfloat16 precision (round-to-nearest-even) and
    back to the input dtype, as the reference's `Bfloat16Dispatcher` does."""
    return x.to(torch.bfloat16).to(x.dtype) if x.is_floating_point() else x


def gate_weighted_sum(rows: Tensor, weights: Tensor) -> Tensor:
    """(G*S*K, D) expert outputs, token-major (token t's K choices at rows
    t*K .. t*K+K-1), and (G, S, K) gates -> (G, S, D) gate-weighted sums."""
    groups, group_size, k = weights.shape
    dim = rows.shape[-1]
    rows = rows.view(groups * group_size, k, dim)
    w = weights.reshape(-1, k, 1).to(rows.dtype)
    if k == 1:
        out = rows[:, 0] * w[:, 0]
    else:
        out = torch.bmm(w.transpose(1, 2), rows).squeeze(1)
    return out.view(groups, group_size, dim)


class Bfloat16Dispatcher:
    """Wraps any dispatcher: tokens are rounded to bfloat16 before they are
    dispatched and expert outputs before they are combined; the combine
    weights and sums keep the input dtype (reference `Bfloat16Dispatcher`)."""

    def __init__(self, inner: Dispatcher) -> None:
        self.inner = inner

    def dispatch(self, x: Tensor) -> Tensor:
        return self.inner.dispatch(round_to_bfloat16(x))

    def combine(self, y: Tensor) -> Tensor:
        return self.inner.combine(round_to_bfloat16(y))


class IndexDispatcher:
    """Gather/gather dispatcher for top-K-experts-per-item routing.

    Dispatch gathers each slot's token (empty slots read zeros); combine
    gathers each token's K slots (a dropped choice reads zeros, so it
    contributes exactly zero) and takes their gate-weighted sum. Both
    gathers know their inverse map, so their backward passes are gathers as
    well (`moe.gather.paired_gather`): no scatter, no atomic adds.

    Attributes:
      slot_token: (E*G*C,) token (row of the (G*S, D) input) in each slot,
        G*S for an empty slot.
      token_slot: (G*S, K) slot of each token's choices, E*G*C for a
        dropped one.
      slot_choice: (E*G*C, 1) row t*K + k of the choice in each slot, G*S*K
        for an empty slot.
      weights: (G, S, K) combine weights, zero for dropped choices.
    """

    def __init__(self, routing: TopExpertsRouting) -> None:
        groups, group_size, k = routing.expert_index.shape
        capacity, num_experts = routing.capacity, routing.num_experts
        device = routing.expert_index.device
        self.groups, self.group_size, self.k = groups, group_size, k
        self.num_experts, self.capacity = num_experts, capacity
        self.plan = routing
        kept = routing.kept                                               # (G, S, K)
        group_offset = torch.arange(groups, device=device).view(groups, 1, 1) * capacity
        slot = routing.expert_index * (groups * capacity) + group_offset + routing.buffer_index
        num_slots = num_experts * groups * capacity
        tokens = groups * group_size
        # Dropped choices point at the zero row past the last slot.
        slot = torch.where(kept, slot, torch.full_like(slot, num_slots)).reshape(-1)  # (G*S*K,)
        choices = torch.arange(tokens * k, device=device)
        slot_choice = torch.full((num_slots + 1,), tokens * k, dtype=torch.long, device=device)
        slot_choice.scatter_(0, slot, choices)
        self.slot_choice = slot_choice[:num_slots].view(num_slots, 1)
        # An empty slot's choice row is G*S*K, whose token is G*S: the zero row.
        self.slot_token = self.slot_choice[:, 0] // k
        self.token_slot = slot.view(tokens, k)
        self.weights = routing.combine_weights * kept                     # (G, S, K)

    def dispatch(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (E, G*C, D); empty slots hold zeros."""
        dim = x.shape[-1]
        return paired_gather(x.reshape(-1, dim), self.slot_token, self.token_slot).view(
            self.num_experts, self.groups * self.capacity, dim)

    def combine(self, y: Tensor) -> Tensor:
        """(E, G*C, D) -> (G, S, D), the gate-weighted sum over kept choices."""
        dim = y.shape[-1]
        # A dropped choice reads the zero row, so a non-finite value in some
        # slot cannot leak in through 0 * NaN.
        gathered = paired_gather(y.reshape(-1, dim), self.token_slot.reshape(-1), self.slot_choice)
        return gate_weighted_sum(gathered, self.weights)


class DroplessDispatcher:
    """Capacity-free dispatch for top-K routing: every (token, choice) pair
    becomes one row, rows are sorted by expert (stable: token order within
    an expert), and the experts run on their exact row counts with grouped
    matmuls (`Experts.forward_grouped`). Nothing is dropped and no buffer is
    padded; all groups are dispatched together. Combine is the index
    dispatcher's gate-weighted sum over each token's K rows.

    Both gathers know their inverse map, so their backward passes are
    gathers too (`moe.gather.paired_gather`).

    Attributes:
      offsets: (E,) int32 end row of each expert's segment (device tensor).
      row_expert: (G*S*K,) int64 expert of each sorted row.
      row_token: (G*S*K,) token of each sorted row.
      choice_row: (G*S, K) sorted row of each token's choices.
      row_choice: (G*S*K, 1) choice (t*K + k) in each sorted row.
    """

    def __init__(self, expert_index: Tensor, combine_weights: Tensor, num_experts: int) -> None:
        groups, group_size, k = expert_index.shape
        self.groups, self.group_size, self.k, self.num_experts = groups, group_size, k, num_experts
        flat = expert_index.reshape(-1)                                   # (T*K,) choice-major per token
        self.row_expert, order = torch.sort(flat, stable=True)
        counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        self.offsets = counts.cumsum(0).to(torch.int32)
        self.row_token = order // k                                       # token of each sorted row
        self.row_choice = order.view(-1, 1)
        self.choice_row = torch.empty_like(order).scatter_(
            0, order, torch.arange(order.numel(), device=flat.device)).view(-1, k)
        self.weights = combine_weights                                    # (G, S, K)

    def dispatch(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (G*S*K, D) rows sorted by expert."""
        return paired_gather(x.reshape(-1, x.shape[-1]), self.row_token, self.choice_row)

    def combine(self, y: Tensor) -> Tensor:
        """(G*S*K, D) expert outputs -> (G, S, D)."""
        return gate_weighted_sum(paired_gather(y, self.choice_row.reshape(-1), self.row_choice), self.weights)


class ExpertChoiceDispatcher:
    """Gather/scatter-add dispatcher for expert-choice routing: an item may
    sit in any number of experts' buffers (or none)."""

    def __init__(self, routing: TopItemsRouting, group_size: int) -> None:
        groups, num_experts, capacity = routing.item_index.shape
        self.groups, self.group_size = groups, group_size
        self.num_experts, self.capacity = num_experts, capacity
        offset = torch.arange(groups, device=routing.item_index.device).view(groups, 1, 1)
        tokens = routing.item_index + offset * group_size                 # (G, E, C)
        self.slot_token = tokens.transpose(0, 1).reshape(-1)              # (E*G*C,)
        self.slot_weight = routing.combine_weights.transpose(0, 1).reshape(-1)

    def dispatch(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (E, G*C, D)."""
        dim = x.shape[-1]
        return x.reshape(-1, dim).index_select(0, self.slot_token).view(
            self.num_experts, self.groups * self.capacity, dim)

    def combine(self, y: Tensor) -> Tensor:
        """(E, G*C, D) -> (G, S, D)."""
        dim = y.shape[-1]
        y = y.reshape(-1, dim) * self.slot_weight.to(y.dtype).unsqueeze(-1)
        out = y.new_zeros(self.groups * self.group_size, dim)
        out = out.index_add(0, self.slot_token, y)
        return out.view(self.groups, self.group_size, dim)


def routing_to_dense(routing: TopExpertsRouting, gates: Tensor) -> Tensor:
    """(G, S, E, C) combine weights (gate where the item sits in slot c of
    expert e, else 0) from an index routing plan. Test/debug helper."""
    groups, group_size, num_experts = gates.shape
    capacity = routing.capacity
    out = gates.new_zeros(groups, group_size, num_experts * capacity + 1)
    kept = routing.kept
    col = torch.where(kept, routing.expert_index * capacity + routing.buffer_index,
                      torch.full_like(routing.buffer_index, num_experts * capacity))
    out.scatter_(2, col, torch.where(kept, routing.combine_weights, torch.zeros_like(routing.combine_weights)))
    return out[..., :-1].view(groups, group_size, num_experts, capacity)


def dense_combine_weights(gates: Tensor, num_selected_experts: int, capacity: int,
                          batch_priority: bool) -> Tensor:
    """(G, S, E) gates -> (G, S, E, C) combine weights, identical to the
    reference EinsumDispatcher's `combine_weights`. Not the hot path."""
    routing = top_experts_per_item(gates, num_selected_experts, capacity, batch_priority)
    return routing_to_dense(routing, gates)


def top_items_to_dense(routing: TopItemsRouting, gates: Tensor) -> Tensor:
    """(G, S, E, C) combine weights of expert-choice routing."""
    groups, group_size, num_experts = gates.shape
    capacity = routing.capacity
    out = gates.new_zeros(groups, num_experts, capacity, group_size)
    out.scatter_(3, routing.item_index.unsqueeze(-1), routing.combine_weights.unsqueeze(-1))
    return out.permute(0, 3, 1, 2)


class EinsumDispatcher:
    """The reference's readable dispatcher: (G, S, E, C) one-hot einsums."""

    def __init__(self, combine_weights: Tensor, dispatch_mask: Tensor | None = None) -> None:
        self.combine_weights = combine_weights                           # (G, S, E, C)
        self.dispatch_mask = combine_weights > 0 if dispatch_mask is None else dispatch_mask

    def dispatch(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (E, G*C, D)."""
        groups, _, num_experts, capacity = self.combine_weights.shape
        buf = torch.einsum("gsec,gsd->egcd", self.dispatch_mask.to(x.dtype), x)
        return buf.reshape(num_experts, groups * capacity, x.shape[-1])

    def combine(self, y: Tensor) -> Tensor:
        """(E, G*C, D) -> (G, S, D)."""
        groups, _, num_experts, capacity = self.combine_weights.shape
        y = y.view(num_experts, groups, capacity, y.shape[-1])
        return torch.einsum("gsec,egcd->gsd", self.combine_weights.to(y.dtype), y)


class SoftDispatcher:
    """Soft MoE (arXiv 2308.00951, Eqs. 1-3): every slot is a convex mix of
    its group's tokens and every token a convex mix of all slot outputs.

    Both directions are one batched matmul per group; nothing is gathered or
    dropped. Buffer layout as for the sparse dispatchers: row `g*p + s` of
    expert n holds group g's slot s (so C = p).

    Args:
      dispatch_weights: (G, S, E, p), softmax over S.
      combine_weights: (G, S, E, p), softmax over (E, p).
    """

    def __init__(self, dispatch_weights: Tensor, combine_weights: Tensor) -> None:
        groups, group_size, num_experts, slots = dispatch_weights.shape
        self.groups, self.num_experts, self.slots = groups, num_experts, slots
        self.dispatch_weights = dispatch_weights.reshape(groups, group_size, num_experts * slots)
        self.combine_weights = combine_weights.reshape(groups, group_size, num_experts * slots)

    def dispatch(self, x: Tensor) -> Tensor:
        """(G, S, D) -> (E, G*p, D): X[n, g*p + s] = sum_i D[g, i, n, s] x[g, i]."""
        dim = x.shape[-1]
        slots = torch.bmm(self.dispatch_weights.transpose(1, 2).to(x.dtype), x)  # (G, E*p, D)
        slots = slots.view(self.groups, self.num_experts, self.slots, dim).transpose(0, 1)
        return slots.reshape(self.num_experts, self.groups * self.slots, dim)

    def combine(self, y: Tensor) -> Tensor:
        """(E, G*p, D) -> (G, S, D): y[g, i] = sum_(n,s) Cw[g, i, n, s] Y[n, g*p + s]."""
        dim = y.shape[-1]
        y = y.view(self.num_experts, self.groups, self.slots, dim).transpose(0, 1)
        y = y.reshape(self.groups, self.num_experts * self.slots, dim)
        return torch.bmm(self.combine_weights.to(y.dtype), y)
