"""The MoE auxiliary loss in training loops that were not written for it.

A generic loop computes `loss_fn(model(x), y)` and would train the router
without its load-balancing loss. Two safeguards:

- `WithAuxiliaryLoss(criterion, model)`: a drop-in loss (timm's `train_one_epoch`,
  Lightning, plain loops) that adds `model.auxiliary_loss` of the forward
  that produced the output, and repeats the targets for E^3 members.
- `AuxLossGuard`: the model's check. When a backward pass reached the logits
  of a training forward but not its auxiliary loss, the next training forward
  warns once, naming the fix. It uses gradient hooks only (no host sync) and
  is skipped under torch.compile and tracing.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor, nn


class AuxLossGuard:
    """Warns once when training ignores the auxiliary loss."""

    def __init__(self) -> None:
        self.flags: dict[str, bool] = {}
        self.warned = False

    def watch(self, logits: Tensor, aux: Tensor) -> None:
        """Called by a training forward with its logits and auxiliary loss."""
        if self.warned or not (logits.requires_grad and aux.requires_grad):
            return
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return
        if self.flags.get("logits") and not self.flags.get("aux"):
            self.warned = True
            warnings.warn(
                "The MoE auxiliary loss of the previous training step got no gradient: the router "
                "trains without its load-balancing loss. Add `model.auxiliary_loss` to the loss, or "
                "wrap the criterion: `vmoe_torch.WithAuxiliaryLoss(criterion, model)`.", stacklevel=3)
            return
        flags: dict[str, bool] = {}
        self.flags = flags
        logits.register_hook(_mark(flags, "logits"))
        aux.register_hook(_mark(flags, "aux"))


def _mark(flags: dict[str, bool], key: str) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:  # noqa: ARG001 - only the call matters
        flags[key] = True
    return hook


class WithAuxiliaryLoss(nn.Module):
    """`criterion(output, target) + model.auxiliary_loss`.

    `model` may be wrapped (DDP, FSDP, torch.compile): the V-MoE inside is
    found through `.module` / `._orig_mod`. For an E^3 model, whose output
    has one row per member, the targets are repeated to match (the
    reference trains every member on the labels)."""

    def __init__(self, criterion: Callable[[Tensor, Tensor], Tensor], model: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion
        self._model = [model]  # a list: not registered as a submodule (no double state_dict)

    @property
    def model(self) -> Any:
        m: Any = self._model[0]
        while hasattr(m, "module") or hasattr(m, "_orig_mod"):
            m = getattr(m, "module", None) or m._orig_mod
        return m

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        model = self.model
        members = getattr(model, "ensemble_size", 1)
        if members > 1 and output.shape[0] == target.shape[0] * members:
            target = target.repeat_interleave(members, dim=0)
        return self.criterion(output, target) + model.auxiliary_loss
