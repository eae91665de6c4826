"""Adversarial robustness of MoE models: PGD attacks and how routing changes
under them, as the reference's `projects/adversarial_attacks` ("On the
Adversarial Robustness of Mixture of Experts", Puigcerver et al. 2022).

The attack (`pgd_attack`, the reference's `stateless_attack_pgd`): the
model in eval mode (deterministic routing), `steps` updates
x <- x + (eps / steps) * sign(grad_x loss), the loss the batch's mean
softmax cross-entropy (plus the auxiliary loss with
`attack_auxiliary_loss`). The total change of a pixel is at most eps, in the
model's input range [-1, 1] (eps = 1/127.5 is one grey level of 255); as in
the reference, there is no projection and no clipping to the valid range.

The statistics (`attack_dataset`, the reference's `AttackState`): clean and
adversarial accuracy and loss, the fraction of predictions the attack
changed, and per MoE layer the routing change: 1 - the mean over images of
the mean over tokens of the intersection over union of the experts that
processed the token before and after the attack (an expert counts when the
token holds one of its buffer slots; a token processed by no expert in both
runs counts IoU 0, as in the reference). Soft MoE layers process every token
by every expert and report no routing change.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..moe.dispatch import DroplessDispatcher, EinsumDispatcher, ExpertChoiceDispatcher, IndexDispatcher


def pgd_attack(model: Any, images: Tensor, labels: Tensor, eps: float, steps: int,
               attack_auxiliary_loss: bool = False) -> Tensor:
    """(B, C, H, W) images -> their PGD-attacked copies (the model's
    parameters get no gradient). `model` must be in eval mode."""
    if steps < 1 or not eps >= 0:
        raise ValueError(f"PGD needs steps >= 1 and eps >= 0, got steps={steps}, eps={eps}.")
    if model.training:
        raise ValueError("Attack a model in eval mode (model.eval()): the reference attacks deterministic routing.")
    delta = eps / steps
    x = images.detach().clone()
    for _ in range(steps):
        x.requires_grad_(True)
        loss = F.cross_entropy(model(x), labels)
        if attack_auxiliary_loss:
            loss = loss + model.auxiliary_loss
        (grad,) = torch.autograd.grad(loss, x)
        x = (x.detach() + delta * grad.sign()).detach()
    return x


def selected_experts(dispatcher: Any, groups: int, size: int, num_experts: int,
                     device: torch.device) -> Optional[Tensor]:
    """(G*S, E) bool on `device`: which experts process each token of a
    routed run, from its dispatcher; None for Soft MoE (every expert sees
    every token)."""
    inner = getattr(dispatcher, "inner", dispatcher)
    tokens = groups * size
    if isinstance(inner, EinsumDispatcher):
        return inner.dispatch_mask.any(-1).reshape(tokens, num_experts)
    mask = torch.zeros(tokens * num_experts + 1, dtype=torch.bool, device=device)
    if isinstance(inner, IndexDispatcher):
        plan = inner.plan
        token = torch.arange(tokens, device=device).view(groups, size, 1)
        flat = torch.where(plan.kept, token * num_experts + plan.expert_index, tokens * num_experts)
        mask[flat.reshape(-1)] = True
    elif isinstance(inner, DroplessDispatcher):
        mask[inner.row_token * num_experts + inner.row_expert] = True
    elif isinstance(inner, ExpertChoiceDispatcher):
        expert = torch.arange(num_experts, device=device).repeat_interleave(groups * inner.capacity)
        mask[inner.slot_token * num_experts + expert] = True
    else:
        return None
    return mask[:-1].view(tokens, num_experts)


@contextlib.contextmanager
def record_selected(model: Any) -> Iterator[dict[str, list[Tensor]]]:
    """Within the block, every routed run of every MoE layer appends its
    (G*S, E) selected-experts mask to `recorded[layer]` (Soft MoE layers
    record nothing)."""
    recorded: dict[str, list[Tensor]] = {}
    handles = []

    def hook_for(name: str, experts: int):
        def hook(module: Any, inputs: Any, output: Any) -> None:  # noqa: ARG001
            groups, size = inputs[0].shape[:2]
            mask = selected_experts(output[0], groups, size, experts, inputs[0].device)
            if mask is not None:
                recorded[name].append(mask)
        return hook
    try:
        for name, layer in model.moe_layers().items():
            recorded[name] = []
            handles.append(layer.router.register_forward_hook(hook_for(name, layer.num_experts)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def _forward(model: Any, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(per-image loss, prediction, layer -> (B, N, E) selected experts)."""
    with torch.no_grad(), record_selected(model) as recorded:
        logits = model(images)
    loss = F.cross_entropy(logits, labels, reduction="none")
    masks = {name: torch.cat(runs).view(len(images), -1, runs[0].shape[-1])
             for name, runs in recorded.items() if runs}
    return loss, logits.argmax(-1), masks


def mean_iou(a: Tensor, b: Tensor) -> Tensor:
    """(B, N, E) bool, (B, N, E) bool -> (B,) the mean over tokens of the
    IoU of the two expert sets (0 where both are empty, as the reference)."""
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)).mean(-1)


def attack_dataset(model: Any, batches: Iterable[tuple[Tensor, Tensor]], eps: float, steps: int,
                   attack_auxiliary_loss: bool = False) -> dict[str, Any]:
    """PGD on every batch; the reference's statistics over all images:
    clean / adversarial top-1 and loss, prediction changes, and per MoE
    layer the routing change (see the module docstring)."""
    model.eval()
    n = changes = 0
    correct = [0, 0]
    loss_sum = [0.0, 0.0]
    iou_sum: dict[str, float] = {}
    for images, labels in batches:
        adv = pgd_attack(model, images, labels, eps, steps, attack_auxiliary_loss)
        l0, y0, m0 = _forward(model, images, labels)
        lm, ym, mm = _forward(model, adv, labels)
        n += len(images)
        changes += int((ym != y0).sum())
        for i, (loss, pred) in enumerate(((l0, y0), (lm, ym))):
            correct[i] += int((pred == labels).sum())
            loss_sum[i] += float(loss.sum())
        for name in m0:
            iou_sum[name] = iou_sum.get(name, 0.0) + float(mean_iou(m0[name], mm[name]).sum())
    if n == 0:
        raise ValueError("The attack got no images: check the data split.")
    return {"eps": eps, "steps": steps, "attack_auxiliary_loss": attack_auxiliary_loss, "num_images": n,
            "clean_top1": correct[0] / n, "adversarial_top1": correct[1] / n,
            "clean_loss": loss_sum[0] / n, "adversarial_loss": loss_sum[1] / n,
            "prediction_changes": changes / n,
            "routing_changes": {name: 1 - total / n for name, total in iou_sum.items()}}


def attack_sweep(model: Any, make_batches: Any, eps_values: Iterable[float], steps: int,
                 attack_auxiliary_loss: bool = False) -> list[dict[str, Any]]:
    """`attack_dataset` at each eps (`make_batches()` gives a fresh pass
    over the same images each time)."""
    return [attack_dataset(model, make_batches(), eps, steps, attack_auxiliary_loss) for eps in eps_values]


def write_attack(rows: list[dict[str, Any]], out_dir: str, label: str) -> str:
    """OUT/attack.json (the rows, under `label`: several models may share
    one file, e.g. a V-MoE and its dense twin) and OUT/attack.png; returns
    the JSON path. `vmoe analyze --out OUT` shows both in report.html."""
    import json
    import os

    from ..utils.io import atomic_write_json
    from .plots import plot_attack
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "attack.json")
    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[label] = rows
    atomic_write_json(path, data)
    plot_attack(data, os.path.join(out_dir, "attack.png"))
    return path
