"""Routing groups: how a layer's B*N tokens are cut into groups of
`group_size`, and how the metrics of the full groups and of a smaller
remainder group are put back together.

Axis legend: see `vmoe_torch.moe.routing`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

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
    size = num_tokens if group_size is None else group_size  # checked by check_group_size
    full, rest = num_tokens // size, num_tokens % size  # (SymInt-friendly: no divmod)
    runs = []
    if full:
        runs.append((0, full, size))
    if rest:
        runs.append((full * size, 1, rest))
    return runs


def merge_runs(runs: list[Metrics]) -> Metrics:
    """Concatenates per-group metrics of the full groups and the remainder
    group; 0-dim metrics (Soft MoE's) are averaged over the runs; the
    capacity is the largest; `auxiliary_loss` is the mean over ALL groups."""
    merged: Metrics = {}
    for key in runs[0]:
        values = [m[key] for m in runs if key in m]
        if len(values) == 1:
            merged[key] = values[0]
        elif key == "capacity":
            merged[key] = torch.stack(values).max()
        elif values[0].dim() == 0:
            merged[key] = torch.stack(values).mean()
        else:
            merged[key] = torch.cat(values)
    merged["auxiliary_loss"] = merged["auxiliary_loss_per_group"].mean()
    return merged
