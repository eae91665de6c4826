"""Expert buffer capacity, exactly as `vmoe.moe.compute_capacity`."""
from __future__ import annotations

import math
from typing import Literal, Optional

CeilOrRound = Literal["ceil", "round"]


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    ceil_or_round: CeilOrRound = "ceil",
    multiple_of: Optional[int] = 4,
) -> int:
    """Returns the per-expert buffer size C for one routing group.

    Args:
      num_tokens: number of assignments to spread over the experts. For
        top-K-experts-per-item routing the reference passes
        `group_size * K`; for expert-choice routing, `group_size`.
      num_experts: E.
      capacity_factor: the target ratio C * E / num_tokens.
      ceil_or_round: "ceil" (default) or "round" (Python's round: halves go
        to the even neighbour, 2.5 -> 2).
      multiple_of: if truthy and > 0, C is raised to the next multiple of it.
        None or 0 leave C as computed.

    Raises:
      ValueError: on an unknown rounding mode, a non-positive number of
        experts or tokens, or when the computed capacity is below 1.
    """
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}.")
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}.")
    if ceil_or_round == "ceil":
        capacity = int(math.ceil(num_tokens * capacity_factor / num_experts))
    elif ceil_or_round == "round":
        capacity = int(round(num_tokens * capacity_factor / num_experts))
    else:
        raise ValueError(
            f"Unsupported ceil_or_round={ceil_or_round!r}: use 'ceil' or 'round'.")
    if capacity < 1:
        raise ValueError(
            f"num_tokens={num_tokens}, num_experts={num_experts} and "
            f"capacity_factor={capacity_factor} give capacity={capacity}, but it "
            "must be >= 1. Raise capacity_factor or the group size, or pass an "
            "explicit capacity.")
    if multiple_of and multiple_of > 0:
        capacity += (-capacity) % multiple_of
    return capacity
