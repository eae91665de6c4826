"""CPU GEMM paths for the linear layers, fp32 (ratios from one run).

Compares, at ViT-S/32 and ViT-B/16 MLP shapes (tokens x D -> H):
  mkl       torch's default CPU linear (F.linear; MKL sgemm in this build)
  onednn    oneDNN's linear through torch.utils.mkldnn (MkldnnLinear:
            prepacked weights, inference only, no autograd)
and the largest difference between their outputs.

Usage: python benchmarks/cpu_gemm.py [--threads 2] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils import mkldnn as mkldnn_utils

SHAPES = {"S32 MLP (32 img x 50 tok)": (1600, 384, 1536), "B16 MLP (8 img x 197 tok)": (1576, 768, 3072)}


def median_s(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print("| shape | MKL linear (ms) | oneDNN linear (ms) | MKL GFLOP/s | oneDNN GFLOP/s "
          "| oneDNN / MKL speed | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name, (n, d, h) in SHAPES.items():
        torch.manual_seed(0)
        lin = torch.nn.Linear(d, h).eval()
        x = torch.randn(n, d)
        packed = mkldnn_utils.to_mkldnn(torch.nn.Sequential(lin))
        with torch.no_grad():
            t_mkl = median_s(lambda: F.linear(x, lin.weight, lin.bias), args.repeats)
            t_dnn = median_s(lambda: packed(x.to_mkldnn()).to_dense(), args.repeats)
            diff = float((F.linear(x, lin.weight, lin.bias) - packed(x.to_mkldnn()).to_dense()).abs().max())
        flops = 2 * n * d * h
        print(f"| {name} | {t_mkl * 1e3:.2f} | {t_dnn * 1e3:.2f} | {flops / t_mkl / 1e9:.0f} | "
              f"{flops / t_dnn / 1e9:.0f} | {t_mkl / t_dnn:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
