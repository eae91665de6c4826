"""Measuring a model's accuracy-compute curve (`vmoe calibrate`).

For every routing setting that changes compute without retraining (K,
capacity factor, BPR, dropless; capacity alone for Expert Choice), on a
held-out split: top-1, FLOPs per image counted by torch's FlopCounterMode
over what ran (expert buffers at the real capacity, filled or not; dropless
expert rows as routed), and the latency of one batch on this machine. The
result is a `storage.calibration.Calibration`, whose Pareto frontier
`model.at_budget(...)` chooses from.
"""
from __future__ import annotations

import itertools
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..data.pipeline import to_model_range
from ..storage.calibration import ROUTING_KEYS, Calibration, Point
from .classification import evaluate_classification

CAPACITY_FACTORS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.05, 1.5, 2.0)


def _grouped_mm_flops(a_shape: Sequence[int], b_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    """torch's grouped_mm (dropless experts): every row of `a` (R, D) meets
    one expert's (D, H) matrix: 2·R·D·H."""
    return 2 * int(a_shape[0]) * int(a_shape[-1]) * int(b_shape[-1])


def _sdpa_cpu_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int],
                    *args: Any, **kwargs: Any) -> int:
    """The CPU's fused attention: its two matmuls, as torch counts the others."""
    from torch.utils.flop_counter import sdpa_flop_count
    return int(sdpa_flop_count(q_shape, k_shape, v_shape))


def _sdpa_cpu_backward_flops(grad_shape: Sequence[int], q_shape: Sequence[int], k_shape: Sequence[int],
                             v_shape: Sequence[int], *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return int(sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape))


def flop_mapping() -> dict[Any, Any]:
    """FlopCounterMode formulas for the operators torch's registry leaves
    out: grouped_mm (dropless experts) and the CPU's fused attention (its
    forward and backward)."""
    aten = torch.ops.aten
    mapping: dict[Any, Any] = {}
    if hasattr(aten, "_grouped_mm"):
        mapping[aten._grouped_mm] = _grouped_mm_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return mapping


def count_flops(model: Any, images: torch.Tensor) -> float:
    """Forward FLOPs per image of `model` on `images` (model range), as the
    model routes them now: torch's FlopCounterMode, with `flop_mapping` for
    what it does not count by itself."""
    from torch.utils.flop_counter import FlopCounterMode
    mapping = flop_mapping()
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(images)
    return counter.get_total_flops() / images.shape[0]


def routing_settings(model: Any, capacity_factors: Sequence[float] = CAPACITY_FACTORS,
                     num_selected_experts: Optional[Sequence[int]] = None,
                     batch_priority: Sequence[bool] = (False, True), dropless: bool = True) -> list[dict[str, Any]]:
    """The settings to measure, the model's own first. Top-K: K (default 1
    .. the trained K) x capacity factor x BPR, and dropless per K; Expert
    Choice: the capacity factor. Soft MoE has nothing to sweep."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("Calibration sweeps the routing of MoE layers; this model has none.")
    own = next(iter(layers.values())).routing
    if any(layer.routing.router == "soft" for layer in layers.values()):
        raise ValueError("A Soft MoE model's compute is fixed by its slots (its parameters), and it "
                         "drops nothing: there is no routing setting to calibrate.")
    first = {k: getattr(own, k) for k in ROUTING_KEYS}
    if own.router == "expert_choice":
        rest = [{**first, "capacity_factor": c} for c in capacity_factors]
    else:
        ks = list(num_selected_experts) if num_selected_experts else list(range(1, own.num_selected_experts + 1))
        rest = [{"num_selected_experts": k, "capacity_factor": c, "batch_priority": b, "dropless": False}
                for k, c, b in itertools.product(ks, capacity_factors, batch_priority)]
        if dropless:
            rest += [{"num_selected_experts": k, "capacity_factor": own.capacity_factor, "batch_priority": False,
                      "dropless": True} for k in ks]
    out = [first]
    for s in rest:
        if s not in out:
            out.append(s)
    return out


def _latency_ms(model: Any, images: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        model(images)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(images)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def calibrate(model: Any, loader_fn: Callable[[], Iterable], batch_size: int = 64, repeats: int = 3,
              split: str = "test", progress: Optional[Callable[[str], None]] = None,
              **sweep: Any) -> Calibration:
    """Measures every setting of `routing_settings(model, **sweep)`:
    `loader_fn()` gives a fresh held-out loader of (uint8 images, labels);
    FLOPs and latency are measured on its first `batch_size` images. The
    model's routing is restored afterwards."""
    settings = routing_settings(model, **sweep)
    images = _first_images(loader_fn(), batch_size).to(next(model.parameters()).device)
    points = []
    for i, routing in enumerate(settings):
        with model.routing(**routing):
            result = evaluate_classification(model, loader_fn())
            flops = count_flops(model, images)
            latency = _latency_ms(model, images, repeats)
        points.append(Point(routing=routing, top1=result["top1"], flops_per_image=flops, latency_ms=latency,
                            images_per_s=images.shape[0] / (latency / 1000)))
        if progress is not None:
            progress(f"[{i + 1}/{len(settings)}] {points[-1].describe()}: top-1 {result['top1']:.4f}, "
                     f"{flops / 1e6:.2f} MFLOPs / image, {latency:.1f} ms / batch")
    measured_on = {"split": split, "images": int(result["num_examples"]), "batch_size": int(images.shape[0]),
                   "cpu": f"{platform.processor() or platform.machine()}, "
                          f"{torch.backends.cpu.get_cpu_capability()}",
                   "torch": torch.__version__}
    return Calibration(points, reference=0, measured_on=measured_on)


def _first_images(loader: Iterable, count: int) -> torch.Tensor:
    parts, have = [], 0
    for images, _ in loader:
        parts.append(images)
        have += len(images)
        if have >= count:
            break
    if not parts:
        raise ValueError("The calibration split is empty.")
    return to_model_range(torch.cat(parts)[:count])
