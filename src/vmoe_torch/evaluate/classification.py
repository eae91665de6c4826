"""Top-1 / top-5 accuracy, precision@1 for multi-label targets, and the
accuracy over a grid of routing settings (no retraining)."""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Optional, Sequence

import torch

from ..data.pipeline import to_model_range
from ..models.ensemble import ensemble_log_probs


@torch.no_grad()
def evaluate_classification(model: Any, loader: Iterable, multilabel: bool = False,
                            bf16: bool = False) -> dict[str, float]:
    """Returns {"top1", "top5", "num_examples", "dropped_fraction"?, ...}.

    With `multilabel`, labels are (B, C) 0/1 and "prec1" (is the top-scoring
    class one of the true labels) replaces top-1/top-5.
    """
    model.eval()
    device = next(model.parameters()).device
    n = correct1 = correct5 = 0
    prec1 = 0.0
    routing_sums: dict[str, float] = {}
    for images, labels in loader:
        x = to_model_range(images.to(device))
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, metrics = model(x, return_metrics=True, members=True)
        # E^3: the members' mean probability (M = 1: log-softmax, same argmax).
        logits = ensemble_log_probs(logits, model.ensemble_size)
        n += len(labels)
        if multilabel:
            prec1 += float(labels.gather(1, logits.argmax(-1, keepdim=True)).sum())
            continue
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct1 += int((top[:, 0] == labels).sum())
        correct5 += int((top == labels[:, None]).any(-1).sum())
        for key, value in metrics.items():
            if key.endswith(("dropped_fraction", "no_expert_fraction")):
                routing_sums[key] = routing_sums.get(key, 0.0) + float(value.float().mean()) * len(labels)
    if n == 0:
        raise ValueError("The evaluation set is empty.")
    if multilabel:
        return {"prec1": prec1 / n, "num_examples": n}
    out = {"top1": correct1 / n, "top5": correct5 / n, "num_examples": n}
    out.update({k: v / n for k, v in routing_sums.items()})
    return out


def processed_fraction(result: dict[str, float]) -> tuple[float, dict[str, float]]:
    """Fraction of tokens processed by at least one expert, overall and per layer."""
    per_layer = {k.split("/")[0]: 1.0 - v for k, v in result.items() if k.endswith("/no_expert_fraction")}
    overall = sum(per_layer.values()) / len(per_layer) if per_layer else 1.0
    return overall, per_layer


def evaluate_at_capacity(model, loader: Iterable, capacity_factor: Optional[float],
                         bf16: bool = False) -> dict[str, float]:
    """`evaluate_classification` with every sparse MoE layer at
    `capacity_factor` (None: as configured). Soft MoE layers drop nothing and
    keep their slots: the factor does not apply to them."""
    sparse = [layer for layer in model.moe_layers().values() if layer.routing.router != "soft"]
    if capacity_factor is None or not sparse:
        return evaluate_classification(model, loader, bf16=bf16)
    saved = [layer.routing for layer in sparse]
    try:
        for layer in sparse:
            layer.set_routing(capacity_factor=capacity_factor)
        return evaluate_classification(model, loader, bf16=bf16)
    finally:
        for layer, routing in zip(sparse, saved):
            layer.apply_routing(routing)


def routing_grid(model, loader_fn, capacity_factors: Sequence[float],
                 num_selected_experts: Optional[Sequence[int]] = None,
                 batch_priority: Sequence[bool] = (False, True), bf16: bool = False) -> list[dict]:
    """Accuracy at every (capacity factor, K, BPR) setting, without retraining.

    `loader_fn()` returns a fresh evaluation loader. K defaults to the trained
    K and 1. Each entry: capacity_factor, num_selected_experts,
    batch_priority, test_accuracy, top5, processed_fraction(_per_layer).
    """
    layers = model.moe_layers()
    if not layers:
        raise ValueError("routing_grid needs a model with MoE layers.")
    if any(layer.routing.router == "soft" for layer in layers.values()):
        raise ValueError("The routing grid sweeps capacity, K and BPR of sparse routers; Soft MoE "
                         "drops nothing and its slot count is fixed by its parameters. Evaluate it "
                         "without --grid (or place it on a sparse model's sweep: vmoe analyze "
                         "--soft-moe).")
    trained_k = next(iter(layers.values())).routing.num_selected_experts
    ks = list(num_selected_experts) if num_selected_experts else sorted({trained_k, 1}, reverse=True)
    rows = []
    for k, cf, bpr in itertools.product(ks, capacity_factors, batch_priority):
        with model.routing(num_selected_experts=k, capacity_factor=cf, batch_priority=bpr):
            res = evaluate_classification(model, loader_fn(), bf16=bf16)
        overall, per_layer = processed_fraction(res)
        rows.append({"capacity_factor": cf, "num_selected_experts": k, "batch_priority": bpr,
                     "test_accuracy": res["top1"], "top5": res["top5"],
                     "processed_fraction": overall, "processed_fraction_per_layer": per_layer})
    return rows


def format_grid(rows: list[dict]) -> str:
    lines = ["| K | C | routing | accuracy | processed |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['num_selected_experts']} | {r['capacity_factor']} | "
                     f"{'BPR' if r['batch_priority'] else 'vanilla'} | {r['test_accuracy']:.4f} | "
                     f"{r['processed_fraction']:.3f} |")
    return "\n".join(lines)
