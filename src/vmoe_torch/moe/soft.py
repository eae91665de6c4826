"""Pure Soft MoE routing functions ("From Sparse to Soft Mixture of Experts",
Puigcerver et al., arXiv 2308.00951; reference `vmoe.projects.soft_moe.router`).

Axis legend as in `vmoe_torch.moe.routing`, plus
  p  slots per expert (the Soft MoE counterpart of the capacity C).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .capacity import compute_capacity

NORM_EPS = 1e-6


def soft_num_slots(group_size: int, num_experts: int, capacity_factor: Optional[float],
                   num_slots: Optional[int] = None) -> int:
    """Slots per expert p: `num_slots` when given (the factor is then
    ignored), else round(S * capacity_factor / E) with Python's round
    (halves to even) and no rounding up to a multiple, as the reference."""
    if num_slots is not None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}.")
        return num_slots
    if capacity_factor is None:
        raise ValueError("Soft MoE needs num_slots or capacity_factor.")
    return compute_capacity(group_size, num_experts, capacity_factor, "round", multiple_of=1)


def l2_normalize(x: Tensor, dim: int, eps: float = NORM_EPS) -> Tensor:
    """x * rsqrt(sum(x**2) + eps) along `dim` (the reference's `normalize`;
    NOT torch's F.normalize, which divides by max(|x|, eps))."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


def soft_router_logits(x: Tensor, mu: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Logits L[g, i, n, s] = <normalised token i of group g, scale * unit mu[:, n, s]>.

    The learned scalar multiplies whichever operand has fewer elements (ties:
    mu), exactly as the reference does; the product is the same up to float
    rounding.

    Args:
      x: (G, S, D) tokens. mu: (D, E, p) slot parameters. scale: () scalar.
    Returns:
      logits (G, S, E, p) and the (possibly scaled) unit mu (D, E, p).
    """
    groups, size, dim = x.shape
    _, num_experts, slots = mu.shape
    x = l2_normalize(x, -1)
    mu = l2_normalize(mu.to(x.dtype), 0)
    scale = scale.to(x.dtype)
    if x.numel() < mu.numel():
        x = x * scale
    else:
        mu = mu * scale
    logits = torch.matmul(x, mu.reshape(dim, num_experts * slots))
    return logits.view(groups, size, num_experts, slots), mu


def soft_weights(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(G, S, E, p) logits -> dispatch weights (softmax over the S tokens:
    each slot mixes its group's tokens) and combine weights (softmax over
    all E*p slots: each token mixes every slot's output)."""
    groups, size, num_experts, slots = logits.shape
    dispatch = torch.softmax(logits, dim=1)
    combine = torch.softmax(logits.reshape(groups, size, num_experts * slots), dim=-1)
    return dispatch, combine.view_as(logits)


def _cosine_self_similarity(v: Tensor, eps: float = 1e-9) -> Tensor:
    """(..., N, F) vectors -> (..., N, N) pairwise cosine similarities."""
    v = v * torch.rsqrt(v.square().sum(-1, keepdim=True) + eps)
    return v @ v.transpose(-1, -2)


def _masked_stats(sim: Tensor, prefix: str) -> dict[str, Tensor]:
    """min / max / mean of the off-diagonal entries of (..., N, N)."""
    n = sim.shape[-1]
    eye = torch.eye(n, dtype=sim.dtype, device=sim.device)
    masked = (1 - eye) * sim
    masked = masked + eye * masked.max()
    count = sim.numel() // n
    return {f"{prefix}_similarity_min": masked.min(),
            f"{prefix}_similarity_max": masked.max(),
            f"{prefix}_similarity_mean": (sim.sum() - count) / (count * (n - 1)) if n > 1
            else sim.new_zeros(())}


@torch.no_grad()
def soft_metrics(dispatch: Tensor, combine: Tensor, mu: Tensor,
                 similarity: bool = True) -> dict[str, Tensor]:
    """The reference SoftRouter's metrics, scalars over all groups.

    Args:
      dispatch, combine: (G, S, E, p). mu: (D, E, p) as used for the logits.
    """
    groups, size, num_experts, slots = combine.shape
    flat_c = combine.reshape(groups, size, num_experts * slots)
    flat_d = dispatch.reshape(groups, size, num_experts * slots)
    metrics = {
        "auxiliary_loss": combine.new_zeros(()),
        "combine_weights_min_mean": flat_c.min(-1).values.mean(),
        "combine_weights_max_mean": flat_c.max(-1).values.mean(),
        "dispatch_weights_min_mean": flat_d.min(1).values.mean(),
        "dispatch_weights_max_mean": flat_d.max(1).values.mean(),
    }
    if similarity:
        metrics.update(_masked_stats(_cosine_self_similarity(flat_c), "combine_weights"))
        metrics.update(_masked_stats(_cosine_self_similarity(flat_d.transpose(1, 2)),
                                     "dispatch_weights"))
        mu_vectors = mu.reshape(mu.shape[0], num_experts * slots).T
        metrics.update(_masked_stats(_cosine_self_similarity(mu_vectors), "mu"))
    return metrics
