"""MoE layer and training throughput on a GPU, bf16 (all ratios from one run).

Layer rows, at B/16 and L/16 shapes (routing groups of 8 images = 1576
tokens, E = 8 and 32, K = 1 and 2, C = 1.05), forward + backward in bf16
autocast with the router in fp32:
  moe       our MoeMlp (index dispatch)
  dropless  the same layer with dropless=True (grouped matmuls)
  experts   the batched expert MLPs alone on the same (E, G*C, D) slots
  einsum    the same layer with the reference's dense einsum dispatch
  dense     a dense MLP with the same active FLOPs (hidden size K*H)
Training rows: images/s of V-MoE-B/16 (Every 2, E=8, K=2) and ViT-B/16 at
224 px, AdamW, bf16 autocast, with the model FLOPs utilisation (MFU =
FLOPs per step from torch's FlopCounterMode / step time / --peak-tflops).

Usage: python benchmarks/gpu_moe.py [--peak-tflops 989] [--repeats 20]
       python benchmarks/gpu_moe.py --device cpu --smoke   (tiny shapes: checks that it runs)
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vmoe_torch import MoeMlp, create_model

LAYER_SHAPES = {"B16": (1576, 4, 768, 3072), "L16": (1576, 4, 1024, 4096)}   # group, groups, D, H
SMOKE_SHAPES = {"tiny": (64, 2, 32, 64)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per function, interleaved across repeats."""
    for fn in fns.values():
        fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def layer_row(shape: tuple[int, int, int, int], experts: int, k: int, repeats: int,
              device: torch.device) -> dict[str, float]:
    group, groups, dim, hidden = shape
    torch.manual_seed(0)
    layer = MoeMlp(dim, hidden, experts, num_selected_experts=k, capacity_factor=1.05,
                   group_size=group).to(device).train()
    layer.noise_seed = 0
    x = torch.randn(groups, group, dim, device=device, requires_grad=True)
    capacity = layer.capacity_for(group)
    buf = torch.randn(experts, groups * capacity, dim, device=device, requires_grad=True)
    dense_w1 = torch.randn(dim, k * hidden, device=device, requires_grad=True)
    dense_w2 = torch.randn(k * hidden, dim, device=device, requires_grad=True)
    auto = torch.autocast(device.type, dtype=torch.bfloat16)

    def moe(**routing):
        def run():
            if routing:
                layer.set_routing(**routing)
            with auto:
                y, m = layer(x)
            (y.float().square().mean() + m["auxiliary_loss"]).backward()
            if routing:
                layer.set_routing(**{key: False for key in routing})
        return run

    def einsum():
        layer.dispatch_impl = "einsum"
        try:
            moe()()
        finally:
            layer.dispatch_impl = "index"

    def experts_alone():
        with auto:
            y = layer.experts(buf)
        y.float().square().mean().backward()

    def dense():
        with auto:
            y = F.gelu(x.view(-1, dim) @ dense_w1, approximate="tanh") @ dense_w2
        y.float().square().mean().backward()

    t = timed({"moe": moe(), "dropless": moe(dropless=True), "experts": experts_alone,
               "einsum": einsum, "dense": dense}, repeats, device)
    return {"C": capacity, **{f"{k_}_ms": v * 1e3 for k_, v in t.items()},
            "moe/experts": t["moe"] / t["experts"], "einsum/moe": t["einsum"] / t["moe"],
            "dropless/moe": t["dropless"] / t["moe"], "moe/dense": t["moe"] / t["dense"]}


def train_row(name: str, batch: int, image: int, steps: int, device: torch.device, peak: float,
              **kw) -> dict[str, float]:
    torch.manual_seed(0)
    model = create_model(name, image_size=image, **kw).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, image, image, device=device)
    y = torch.randint(0, model.config.num_classes, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits, metrics = model(x, return_metrics=True)
        (F.cross_entropy(logits.float(), y) + metrics["auxiliary_loss"]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    seconds = timed({"step": step}, steps, device)["step"]
    return {"images_per_s": batch / seconds, "tflops_per_step": flops / 1e12,
            "mfu": flops / seconds / (peak * 1e12) if peak else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM: 989)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and models, to check the script runs")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: this benchmark is for GPUs (--device cpu --smoke checks that it runs).")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, bf16 autocast, median of {args.repeats}")
    shapes = SMOKE_SHAPES if args.smoke else LAYER_SHAPES
    print("| shape | E | K | C | MoE (ms) | dropless (ms) | experts alone (ms) | einsum (ms) "
          "| dense equal-FLOPs MLP (ms) | MoE / experts | einsum / MoE | dropless / MoE | MoE / dense |")
    print("|" + "---|" * 13)
    for label, shape in shapes.items():
        for e in ((4,) if args.smoke else (8, 32)):
            for k in (1, 2):
                r = layer_row(shape, e, k, args.repeats, device)
                cells = [label, e, k, r["C"], *(f"{r[c]:.2f}" for c in ("moe_ms", "dropless_ms", "experts_ms",
                                                                        "einsum_ms", "dense_ms", "moe/experts",
                                                                        "einsum/moe", "dropless/moe", "moe/dense"))]
                print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    print()
    print("| model | batch | px | images/s | TFLOP / step | MFU |")
    print("|---|---|---|---|---|---|")
    if args.smoke:
        cases = [("vmoe_dense_mi4", 8, 32, {}), ("vmoe_mi4_every2_e8_k2", 8, 32, {})]
    else:
        cases = [("vmoe_dense_b16", 64, 224, {}), ("vmoe_b16_every2_e8_k2", 64, 224, {})]
    for model_name, batch, px, kw in cases:
        r = train_row(model_name, batch, px, args.repeats, device, args.peak_tflops, **kw)
        print(f"| {model_name} | {batch} | {px} | {r['images_per_s']:.1f} | {r['tflops_per_step']:.3f} | "
              f"{r['mfu']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
