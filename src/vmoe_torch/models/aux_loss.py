"""The MoE auxiliary loss in training loops that were not written for it.

A generic loop computes `loss_fn(model(x), y)` and would train the router
without its load-balancing loss. Three pieces:

- `attach_auxiliary_loss` (on by default in every training forward): the
  output carries the auxiliary loss's gradient. A backward pass through the
  output gives the auxiliary loss the gradient `scale` (1: the loop's loss
  is the task loss as computed, not rescaled), as if it had been added to
  the loss. When the loop adds `model.auxiliary_loss` itself (our trainer,
  `WithAuxiliaryLoss`, a hand-written `loss + model.auxiliary_loss`), the
  gradient of that explicit use is taken instead, so it counts once, with
  the loop's own weight and scaling (gradient accumulation, loss scaling).
  Which one counts is decided in the backward pass from the gradients
  themselves (an explicit gradient of exactly zero counts as unused): no
  flag, no order, no host sync.
- `WithAuxiliaryLoss(criterion, model)`: a drop-in loss that adds
  `model.auxiliary_loss` of the forward that produced the output.
- `AuxLossGuard`: with the attachment switched off, warns once when a
  backward reached the logits of a training forward but not its auxiliary
  loss (gradient hooks only; skipped under torch.compile and tracing).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn


class _Split(torch.autograd.Function):
    """aux -> (attached copy, explicit copy). Backward: the explicit copy's
    gradient when the loss used it, else the attached copy's."""

    @staticmethod
    def forward(ctx: Any, aux: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        return aux.clone(), aux.clone()

    @staticmethod
    def backward(ctx: Any, attached: Optional[Tensor], explicit: Optional[Tensor]) -> Optional[Tensor]:  # noqa: ARG004
        if explicit is None:
            return attached
        if attached is None:
            return explicit
        # Compiled graphs pass zeros for an unused output: a zero explicit
        # gradient means the loss did not use it (decided on the device).
        return torch.where(explicit != 0, explicit, attached)


class _Attach(torch.autograd.Function):
    """(output, aux) -> output; backward gives `aux` the gradient `scale`."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.aux_like = (aux.dtype, aux.device)
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        dtype, device = ctx.aux_like
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None


def attach_auxiliary_loss(output: Tensor, aux: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Returns `(output, aux)` to hand to the caller: a backward pass through
    the returned output gives `aux` the gradient `scale`, unless the same
    backward also reaches the returned `aux` (the loss added it): then only
    that explicit gradient counts. Values are unchanged; 0-dim `aux`."""
    attached, explicit = _Split.apply(aux)
    return _Attach.apply(output, attached, scale), explicit


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
