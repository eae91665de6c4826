"""A timm training task that keeps the MoE auxiliary loss.

timm's training library (`timm.task`) computes a step's loss in a task
object: `task(input, target)` -> {"loss", "output"}. `MoeClassificationTask`
is timm's `ClassificationTask` with the auxiliary loss of the same forward
added (through `WithAuxiliaryLoss`), E^3 members trained on their own rows
as the reference does (targets repeated per member), and the two parts
reported separately. Everything else (criterion from
timm's loss factory, DDP, compile, EMA, checkpoint state) is timm's.
"""
from __future__ import annotations

from typing import Any

from timm.task import ClassificationTask
from torch import Tensor

from ..models.aux_loss import WithAuxiliaryLoss


class MoeClassificationTask(ClassificationTask):
    """`ClassificationTask` whose loss is `criterion(output, target) +
    model.auxiliary_loss`. Returns {"loss", "output", "task_loss", "aux_loss"}."""

    def forward(self, input: Tensor, target: Tensor) -> dict[str, Any]:  # noqa: A002 - timm's signature
        with_aux = WithAuxiliaryLoss(self.criterion, self.trainable_module)
        # E^3: the members' rows, each trained on the labels (the reference's loss).
        members = getattr(with_aux.model, "ensemble_size", 1) > 1
        output = self.trainable_module(input, members=True) if members else self.trainable_module(input)
        aux = with_aux.model.auxiliary_loss
        loss = with_aux(output, target)
        return {"loss": loss, "output": output, "task_loss": loss.detach() - aux.detach(),
                "aux_loss": aux.detach()}
