"""Pure routing functions: top-K experts per item (vanilla and Batch Priority
Routing), top items per expert (expert choice), and the auxiliary losses.

Axis legend used by every function in `vmoe_torch.moe`:
  G  routing groups (the B*N tokens cut into consecutive groups)
  S  group size (tokens per group)
  E  number of experts
  C  capacity: buffer slots per expert and group
  K  experts selected per token (num_selected_experts)
  D  hidden size of the tokens

These mirror `vmoe.moe` and `vmoe.nn.routing` of google-research/vmoe; every
rule that matters for parity (tie-breaking, choice-major slot order, stable
priority sort) is stated where it is implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import Tensor

PriorityMode = Literal["max", "sum", "random"]


@dataclass(frozen=True)
class TopExpertsRouting:
    """Result of top-K-experts-per-item routing for G groups.

    Attributes:
      expert_index: (G, S, K) int64, the k-th chosen expert of each token, in
        descending gate order.
      buffer_index: (G, S, K) int64, the slot of that choice in its expert's
        buffer; NOT clipped: a value >= capacity means the choice was dropped.
      combine_weights: (G, S, K) float, the k-th largest gate (not
        renormalised), also for dropped choices; differentiable.
      capacity: C.
      num_experts: E.
    """

    expert_index: Tensor
    buffer_index: Tensor
    combine_weights: Tensor
    capacity: int
    num_experts: int

    @property
    def kept(self) -> Tensor:
        """(G, S, K) bool: the choices that got a buffer slot."""
        return self.buffer_index < self.capacity


@dataclass(frozen=True)
class TopItemsRouting:
    """Result of expert-choice (top items per expert) routing.

    Attributes:
      item_index: (G, E, C) int64, slot c of expert e holds item
        `item_index[g, e, c]`, the item with the c-th largest gate for e.
      combine_weights: (G, E, C) float, the gate of that (item, expert).
      capacity: C.
    """

    item_index: Tensor
    combine_weights: Tensor
    capacity: int


def sorted_top_k(values: Tensor, k: int, dim: int = -1) -> tuple[Tensor, Tensor]:
    """Top-k along `dim`, descending, ties broken by the LOWER index first.

    `torch.topk` documents no tie order; a stable descending sort does, and
    that order is what `jax.lax.top_k` (and so the reference) produces.
    """
    if k == 1:
        # argmax returns the first maximal index; much cheaper than a sort.
        idx = values.argmax(dim=dim, keepdim=True)
        return values.gather(dim, idx), idx
    vals, idx = torch.sort(values, dim=dim, descending=True, stable=True)
    return vals.narrow(dim, 0, k), idx.narrow(dim, 0, k)


def priority_scores(top_gates: Tensor, mode: PriorityMode = "max",
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """BPR priority of each token.

    Args:
      top_gates: (G, S, K) the selected gates in descending order.
      mode: "max" (the paper's and reference's: the top-1 gate), "sum" (sum
        of the K selected gates) or "random" (a uniform random baseline).
    Returns:
      (G, S) scores; larger means served first.
    """
    if mode == "max":
        return top_gates[..., 0]
    if mode == "sum":
        return top_gates.sum(-1)
    if mode == "random":
        return torch.rand(top_gates.shape[:2], generator=generator,
                          device=top_gates.device)
    raise ValueError(f"Unknown priority mode {mode!r}: use 'max', 'sum' or 'random'.")


def positions_within_expert(expert_index: Tensor, num_experts: int) -> Tensor:
    """Running count of each expert along the last axis.

    Args:
      expert_index: (G, T) int64 expert ids in priority order.
    Returns:
      (G, T) int64: how many earlier entries of the row chose the same expert,
      i.e. the buffer slot that entry takes. Computed with a stable sort by
      expert id (O(T log T)), never with a (T, E) one-hot cumsum.
    """
    groups, length = expert_index.shape
    sorted_expert, order = torch.sort(expert_index, dim=1, stable=True)
    counts = torch.zeros(groups, num_experts, dtype=torch.long, device=expert_index.device)
    counts.scatter_add_(1, expert_index, torch.ones_like(expert_index))
    starts = counts.cumsum(1) - counts
    ranks = torch.arange(length, device=expert_index.device).expand(groups, length)
    ranks = ranks - starts.gather(1, sorted_expert)
    return torch.empty_like(expert_index).scatter_(1, order, ranks)


def top_experts_per_item(
    gates: Tensor,
    num_selected_experts: int,
    capacity: int,
    batch_priority: bool,
    priority: PriorityMode = "max",
    generator: Optional[torch.Generator] = None,
) -> TopExpertsRouting:
    """Top-K experts per item with fixed capacity (reference
    `_get_top_experts_per_item_common`).

    1. Each item picks its K largest gates (ties: lower expert id first).
    2. With `batch_priority` (BPR, paper Sec. 4.1) items are visited by
       descending priority with a STABLE sort; otherwise in position order.
    3. Slots are handed out choice-major: every top-1 choice of every item,
       then every top-2 choice, ...; each takes its expert's next free slot.
    4. A choice whose slot is >= `capacity` is dropped.

    A token whose gates are not finite (NaN/Inf input) takes no slot and is
    dropped: it cannot displace other tokens (finite inputs are unaffected).

    Args:
      gates: (G, S, E) routing probabilities.
    Returns:
      A `TopExpertsRouting` with (G, S, K) tensors in the original item order.
    """
    if gates.dim() != 3:
        raise ValueError(f"gates must be (G, S, E), got shape {tuple(gates.shape)}.")
    groups, group_size, num_experts = gates.shape
    k = num_selected_experts
    if not 1 <= k <= num_experts:
        raise ValueError(
            f"num_selected_experts must be in [1, num_experts={num_experts}], got {k}.")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}.")
    top_gates, expert_index = sorted_top_k(gates, k)            # (G, S, K)
    # Non-finite tokens count in a phantom expert E, so they use no real slot.
    finite = torch.isfinite(top_gates).all(-1, keepdim=True)    # (G, S, 1)
    order_index = torch.where(finite, expert_index, num_experts)
    perm = None
    if batch_priority:
        score = priority_scores(top_gates.detach(), priority, generator)
        perm = torch.sort(score, dim=1, descending=True, stable=True).indices  # (G, S)
        order_index = order_index.gather(1, perm.unsqueeze(-1).expand(-1, -1, k))
    # (G, S, K) -> (G, K*S): choice-major so all top-1 choices come first.
    flat = order_index.transpose(1, 2).reshape(groups, k * group_size)
    positions = positions_within_expert(flat, num_experts + 1)
    positions = positions.view(groups, k, group_size).transpose(1, 2)  # (G, S, K)
    if perm is not None:
        positions = torch.empty_like(positions).scatter_(
            1, perm.unsqueeze(-1).expand(-1, -1, k), positions)
    positions = torch.where(finite, positions, capacity)
    return TopExpertsRouting(expert_index=expert_index, buffer_index=positions,
                             combine_weights=top_gates, capacity=capacity,
                             num_experts=num_experts)


def top_items_per_expert(gates: Tensor, capacity: int) -> TopItemsRouting:
    """Expert-choice routing (reference `_get_top_items_per_expert_einsum_dispatcher`):
    each expert takes the `capacity` items with its largest gates (ties:
    lower item index first).

    Args:
      gates: (G, S, E).
    Returns:
      A `TopItemsRouting` with (G, E, C) tensors.
    """
    groups, group_size, _ = gates.shape
    if not 1 <= capacity <= group_size:
        raise ValueError(
            f"Expert-choice capacity must be in [1, group_size={group_size}], got "
            f"{capacity}. Lower capacity_factor or raise group_size.")
    vals, idx = sorted_top_k(gates.transpose(1, 2), capacity)   # (G, E, C)
    return TopItemsRouting(item_index=idx, combine_weights=vals, capacity=capacity)


def top_items_metrics(routing: TopItemsRouting, group_size: int) -> dict[str, Tensor]:
    """Per-group (G,) metrics of expert-choice routing, named as the reference."""
    idx = routing.item_index
    groups, num_experts, _ = idx.shape
    per_item = torch.zeros(groups, group_size, dtype=torch.long, device=idx.device)
    per_item.scatter_add_(1, idx.reshape(groups, -1), torch.ones_like(idx).reshape(groups, -1))
    w = routing.combine_weights.detach().reshape(groups, -1)
    metrics = {
        "num_experts_per_item_min": per_item.min(1).values,
        "num_experts_per_item_max": per_item.max(1).values,
        "min_selected_gate": w.min(1).values,
        "max_selected_gate": w.max(1).values,
    }
    thresholds = [2**i for i in range(int(math.log2(num_experts)) + 1)] + [num_experts]
    for t in thresholds:
        metrics[f"ratio_processed_items_by_at_least_{t}_experts"] = (
            (per_item >= t).float().sum(1) / group_size)
    return metrics


def importance_loss(gates: Tensor) -> Tensor:
    """Importance loss (paper App. A.2): squared coefficient of variation of
    the per-expert sum of gates. (G, S, E) -> (G,)."""
    importance = gates.sum(dim=1)                                 # (G, E)
    return importance.var(dim=-1, unbiased=False) / importance.mean(dim=-1) ** 2


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float,
              num_selected_experts: int) -> Tensor:
    """Load loss (paper App. A.2): squared CV of the per-expert probability of
    being selected if the noise were re-sampled.

    Args:
      logits, noisy_logits: (G, S, E) router logits without / with noise.
      noise_std: the std of the noise actually added (configured noise_std / E).
    Returns:
      (G,)
    """
    threshold = torch.topk(noisy_logits, num_selected_experts, dim=-1).values[..., -1:]
    p = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)   # (G, S, E)
    p_mean = p.mean(dim=1)                                             # (G, E)
    return p_mean.var(dim=-1, unbiased=False) / p_mean.mean(dim=-1) ** 2


def gshard_loss(gates: Tensor) -> Tensor:
    """GShard auxiliary loss (Lepikhin et al. 2020, Alg. 1, times E**2 as in
    lingvo): E**2 * mean_e(mean_s gates * fraction of items whose argmax is e).
    (G, S, E) -> (G,); argmax ties go to the lowest expert."""
    groups, group_size, num_experts = gates.shape
    top1 = gates.argmax(dim=-1)                                        # (G, S)
    counts = torch.zeros(groups, num_experts, dtype=gates.dtype, device=gates.device)
    counts.scatter_add_(1, top1, torch.ones_like(top1, dtype=gates.dtype))
    fraction = counts / group_size
    return (fraction * gates.mean(dim=1)).mean(dim=-1) * num_experts**2


def local_entropy_loss(gates: Tensor) -> Tensor:
    """LIMoE's local entropy loss: the mean over tokens of the entropy of
    each token's gates. (G, S, E) -> (G,)."""
    return -(gates * torch.log(gates.clamp_min(torch.finfo(gates.dtype).tiny))).sum(-1).mean(-1)


def global_entropy_loss(gates: Tensor) -> Tensor:
    """LIMoE's global entropy loss: minus the entropy of the group's mean
    gates. (G, S, E) -> (G,)."""
    mean = gates.mean(1)
    return (mean * torch.log(mean.clamp_min(torch.finfo(gates.dtype).tiny))).sum(-1)
