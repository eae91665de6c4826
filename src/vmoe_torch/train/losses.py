"""Classification losses on (possibly soft, e.g. mixup) targets."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, C) logits, (B, C) target distribution -> mean cross-entropy."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def sigmoid_xent(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's pre-training loss: per-class binary cross-entropy, summed
    over classes, averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").sum(-1).mean()


LOSSES = {"softmax_xent": softmax_xent, "sigmoid_xent": sigmoid_xent}
