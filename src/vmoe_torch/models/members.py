"""E^3 members' rows -> one row per image (pure functions).

An E^3 model repeats each image's tokens M times before its first MoE
block: row b*M + m is image b seen by member m."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def ensemble_log_probs(logits: Tensor, ensemble_size: int) -> Tensor:
    """The reference's E^3 evaluation: (B*M, classes) member logits (row
    b*M + m is image b, member m) -> (B, classes) float32 log of the mean of
    the members' softmax probabilities. M = 1: plain log-softmax."""
    _check_rows(logits, ensemble_size)
    if ensemble_size == 1:
        return torch.log_softmax(logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1).unflatten(0, (-1, ensemble_size))
    return torch.logsumexp(logp, dim=1) - math.log(ensemble_size)


def mean_over_members(x: Tensor, ensemble_size: int) -> Tensor:
    """(B*M, ...) -> (B, ...): each image's rows averaged over the members."""
    _check_rows(x, ensemble_size)
    return x.unflatten(0, (-1, ensemble_size)).mean(1)


def _check_rows(x: Tensor, ensemble_size: int) -> None:
    if isinstance(x, torch.fx.Proxy):  # FX tracing: shapes are symbolic
        return
    if x.shape[0] % ensemble_size:
        raise ValueError(f"{x.shape[0]} rows are not B * ensemble_size={ensemble_size}.")
