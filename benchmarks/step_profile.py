"""Where an eager training step's CPU time goes: the share of the matrix
products (mm, addmm, bmm, baddbmm, grouped_mm), attention and the patch
convolution, from torch.profiler's self CPU times of one fp32 training step
(forward + backward, after a warm-up step), and the top operators.

It bounds what `torch.compile` can gain on the CPU: Inductor calls the same
ATen / oneDNN kernels for these products (extern kernels), so only the rest
of the step can be fused or removed.

Usage: python benchmarks/step_profile.py [--threads 2] [--skip-s32]
"""
from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vmoe_torch import create_model

PRODUCTS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::_grouped_mm",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
            "aten::mkldnn_convolution", "aten::convolution_backward")
CASES = [("demo V-MoE-Mi/8 Every 1, E=8 K=2", "vmoe_mi4_every1_e8_k2",
          dict(num_classes=10, patch_size=8, classifier="gap", group_size=800), 64, 40),
         ("V-MoE-S/32, E=8, K=2, Last 2", "vmoe_s32_last2_e8_k2", dict(num_classes=1000), 32, 224)]


def step(model, x, y) -> None:
    logits, metrics = model(x, return_metrics=True)
    (F.cross_entropy(logits, y) + metrics["auxiliary_loss"]).backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-s32", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {args.threads} threads; one fp32 training step after a warm-up")
    for label, name, kw, batch, px in CASES[:1] if args.skip_s32 else CASES:
        torch.manual_seed(0)
        model = create_model(name, image_size=px, **kw).train()
        model.set_noise_seed(0)
        x, y = torch.randn(batch, 3, px, px), torch.randint(0, 10, (batch,))
        step(model, x, y)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(model, x, y)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS)
        print(f"\n{label}, batch {batch}, {px} px: self CPU {total / 1e3:.1f} ms; matrix products, attention "
              f"and the patch convolution {products / total:.1%}")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
            print(f"  {e.key:58s} {e.self_cpu_time_total / 1e3:8.1f} ms  x{e.count}")


if __name__ == "__main__":
    main()
