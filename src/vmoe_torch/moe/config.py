"""Typed routing settings of one MoE layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

RouterName = Literal["top_experts", "expert_choice"]


@dataclass(frozen=True)
class RoutingConfig:
    """How one MoE layer routes its tokens. All of it may change at inference.

    Attributes:
      router: "top_experts" (reference NoisyTopExpertsPerItemRouter, the
        paper's) or "expert_choice" (NoisyTopItemsPerExpertRouter).
      num_selected_experts: K, experts per token (top_experts only).
      capacity_factor: C = capacity_factor * S * K / E (rounded, see
        `compute_capacity`). Exactly one of this and `capacity` is set.
      capacity: explicit per-group buffer size, used as is.
      capacity_ceil_or_round: "ceil" or "round".
      capacity_multiple_of: round C up to a multiple of this; None/0: don't.
      batch_priority: Batch Priority Routing (sort tokens by priority).
      priority: BPR score: "max" (top gate, the paper's), "sum" of the top-K
        gates, or "random".
      noise_std: router noise is N(0, (noise_std / E)^2) on the logits, in
        training mode only.
      importance_loss_weight, load_loss_weight, gshard_loss_weight: weights
        of the auxiliary losses; a loss with weight 0 is reported, not added.
      bfloat16_dispatch: round tokens entering and outputs leaving the
        experts to bfloat16, as the reference's `dispatcher.bfloat16`.
      ablate: return a zero MoE output (the residual alone), for analysis.
    """

    router: RouterName = "top_experts"
    num_selected_experts: int = 1
    capacity_factor: Optional[float] = 1.05
    capacity: Optional[int] = None
    capacity_ceil_or_round: Literal["ceil", "round"] = "ceil"
    capacity_multiple_of: Optional[int] = 4
    batch_priority: bool = False
    priority: Literal["max", "sum", "random"] = "max"
    noise_std: float = 1.0
    importance_loss_weight: float = 1.0
    load_loss_weight: float = 1.0
    gshard_loss_weight: float = 0.0
    bfloat16_dispatch: bool = False
    ablate: bool = False

    def validate(self, num_experts: int) -> None:
        """Raises ValueError naming the problem and the fix."""
        if self.router not in ("top_experts", "expert_choice"):
            raise ValueError(f"Unknown router {self.router!r}: use 'top_experts' or 'expert_choice'.")
        k = self.num_selected_experts
        if not 1 <= k <= num_experts:
            raise ValueError(
                f"num_selected_experts (K) must be in [1, num_experts={num_experts}], got "
                f"K={k}. Choose K <= E.")
        if (self.capacity is None) == (self.capacity_factor is None):
            raise ValueError(
                "Set exactly one of capacity and capacity_factor, got "
                f"capacity={self.capacity!r}, capacity_factor={self.capacity_factor!r}.")
        if self.capacity is not None and self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}.")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {self.capacity_factor}.")
        if self.capacity_ceil_or_round not in ("ceil", "round"):
            raise ValueError(
                f"capacity_ceil_or_round must be 'ceil' or 'round', got {self.capacity_ceil_or_round!r}.")
        if self.priority not in ("max", "sum", "random"):
            raise ValueError(f"priority must be 'max', 'sum' or 'random', got {self.priority!r}.")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}.")
