"""Training throughput (images/s) on the CPU, measured in one run:

1. the tiny demo V-MoE, its Soft MoE and E^3 variants (configs/demo_soft_moe.yaml,
   configs/demo_eee.yaml) against the dense ViT of the same backbone (ratio);
2. V-MoE-S/32 ("ViT-S/32, E=8, K=2, Last 2", 224 px, batch 32) against the
   dense ViT-S/32, in fp32 and with bf16 autocast.

Each figure is the median over timed steps (forward, backward, AdamW
update) after warm-up steps. The routing statistics are off, as on the
trainer's steps that do not log (`routing_metrics(False)`).

For the demo rows, the FLOPs of one training step (forward + backward,
torch's FlopCounterMode with the library's `flop_mapping`: CPU attention
counted with torch's own attention formulas) and the FLOP ceiling: the dense twin's FLOPs over the model's, the
throughput ratio the model would reach at the dense model's FLOP rate with
no routing cost at all. measured / ceiling is the share of that reached.

With --compile: eager against `torch.compile(model, dynamic=True,
fullgraph=True)` (inductor; the router-noise seed changes every step, as in
training) for the demo V-MoE and V-MoE-S/32, fp32, in one run, with the
time of the first (compiling) step.

Usage: python benchmarks/train_step.py [--threads 2] [--steps 5] [--skip-s32] [--compile]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from vmoe_torch import create_model
from vmoe_torch.config import load_config
from vmoe_torch.evaluate.calibration import flop_mapping
from vmoe_torch.moe.metrics_switch import routing_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"   # the demo's model settings come from here


def images_per_s(name: str, batch: int, image: int, bf16: bool, steps: int, warmup: int,
                 compile: bool = False, first: Optional[list] = None, **kw) -> float:
    torch.manual_seed(0)
    model = create_model(name, image_size=image, **kw).train()
    forward = torch.compile(model, dynamic=True, fullgraph=True) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, image, image)
    y = torch.randint(0, model.config.num_classes, (batch,))
    times = []
    for i in range(warmup + steps):
        model.set_noise_seed(i)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), routing_metrics(False):
            logits, metrics = forward(x, return_metrics=True, members=True)
        members = logits.shape[0] // batch  # E^3: one row per (image, member)
        loss = F.cross_entropy(logits.float(), y.repeat_interleave(members)) + metrics["auxiliary_loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t)
        elif i == 0 and first is not None:
            first.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def step_flops(name: str, batch: int, image: int, **kw) -> float:
    """FLOPs of one training step's forward + backward (no optimizer)."""
    from torch.utils.flop_counter import FlopCounterMode
    mapping = flop_mapping()  # the library's: grouped_mm and the CPU's fused attention
    torch.manual_seed(0)
    model = create_model(name, image_size=image, **kw).train()
    x = torch.randn(batch, 3, image, image)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, routing_metrics(False):
        logits, metrics = model(x, return_metrics=True, members=True)
        (logits.float().logsumexp(-1).mean() + metrics["auxiliary_loss"]).backward()
    return float(counter.get_total_flops())


def compile_rows(args: argparse.Namespace, demo: dict) -> None:
    print("| model | batch | px | eager images/s | compiled images/s | compiled / eager | first compiled step (s) |")
    print("|---|---|---|---|---|---|---|")
    cases = [("demo V-MoE-Mi/8 Every 1, E=8 K=2", demo["moe"].model.name, demo["moe"].data.batch_size,
              demo["moe"].data.image_size, demo["moe"].model.create_kwargs())]
    if not args.skip_s32:
        cases.append(("V-MoE-S/32, E=8, K=2, Last 2", "vmoe_s32_last2_e8_k2", 32, 224, {}))
    for label, name, batch, px, kw in cases:
        eager = images_per_s(name, batch, px, False, args.steps, args.warmup, **kw)
        first: list = []
        compiled = images_per_s(name, batch, px, False, args.steps, args.warmup, compile=True, first=first, **kw)
        print(f"| {label} | {batch} | {px} | {eager:.1f} | {compiled:.1f} | {compiled / eager:.2f} | "
              f"{first[0]:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-s32", action="store_true")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--compile", action="store_true", help="only the eager vs torch.compile rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.steps} steps, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    labels = {"moe": "demo V-MoE-Mi/8 Every 1, E=8 K=2", "soft_moe": "demo Soft MoE-Mi/8, E=8, p=7",
              "eee": "demo E^3-Mi/8, E=8 K=1 M=2"}
    demo = {name: load_config(str(CONFIGS / f"demo_{name}.yaml")) for name in ("dense", *labels)}
    if args.compile:
        compile_rows(args, demo)
        return
    batch, px = demo["moe"].data.batch_size, demo["moe"].data.image_size
    flops = {name: step_flops(cfg.model.name, batch, px, **cfg.model.create_kwargs()) for name, cfg in demo.items()}
    print("| model | batch | px | precision | images/s | ratio to dense | GFLOP / step | FLOP ceiling "
          "| measured / ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for bf16 in ([False] if args.skip_bf16 else [False, True]):
        prec = "bf16 autocast" if bf16 else "fp32"
        dense = images_per_s(demo["dense"].model.name, batch, px, bf16, args.steps, args.warmup,
                             **demo["dense"].model.create_kwargs())
        print(f"| demo dense ViT-Mi/8 | {batch} | {px} | {prec} | {dense:.1f} | 1.00 | "
              f"{flops['dense'] / 1e9:.2f} | 1.00 | 1.00 |", flush=True)
        for name, label in labels.items():
            ips = images_per_s(demo[name].model.name, batch, px, bf16, args.steps, args.warmup,
                               **demo[name].model.create_kwargs())
            ceiling = flops["dense"] / flops[name]
            print(f"| {label} | {batch} | {px} | {prec} | {ips:.1f} | {ips / dense:.2f} | "
                  f"{flops[name] / 1e9:.2f} | {ceiling:.2f} | {ips / dense / ceiling:.2f} |", flush=True)
    if args.skip_s32:
        return
    native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if not native_bf16:
        print("| V-MoE-S/32 bf16 | - | - | - | not measured: this CPU has no native bf16 matmul "
              "(oneDNN reports no AVX512-BF16/AMX); bf16 GEMMs run ~200x slower than fp32 here | - |")
    for bf16 in ([False] if args.skip_bf16 or not native_bf16 else [False, True]):
        prec = "bf16 autocast" if bf16 else "fp32"
        dense = images_per_s("vmoe_dense_s32", 32, 224, bf16, args.steps, args.warmup)
        moe = images_per_s("vmoe_s32_last2_e8_k2", 32, 224, bf16, args.steps, args.warmup)
        print(f"| ViT-S/32 (dense) | 32 | 224 | {prec} | {dense:.1f} | 1.00 |", flush=True)
        print(f"| V-MoE-S/32, E=8, K=2, Last 2 | 32 | 224 | {prec} | {moe:.1f} | {moe / dense:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
