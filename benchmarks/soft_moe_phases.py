"""Where a Soft MoE layer's time goes besides its experts, at the paper's
setting (one image per routing group, p slots per expert matched to a
top-K layer's buffer rows, as `benchmarks/moe_layer.py --soft-only`).

Each phase timed on its own, forward + backward, fp32, with the expert MLP
on the layer's (E, G*p, D) buffers as the yardstick:
  router     normalised tokens and slot vectors, the (G, S, E*p) logits
             and both softmaxes (float32, as the layer runs them)
  dispatch   the slot mix: one (E*p x S) @ (S x D) matmul per group
  combine    the token mix: one (S x E*p) @ (E*p x D) matmul per group
  bf16_round the reference's bfloat16 rounding of the tokens and of the
             expert outputs (Bfloat16Dispatcher)
  experts    the expert MLP alone (the yardstick)
  layer      the whole layer, statistics off (as on unlogged steps)
  experts_c, layer_c  with --compile: the same two under torch.compile
             (inductor, fullgraph), where the element-wise passes around
             the mixes (normalisations, softmaxes, bfloat16 rounding) fuse

Each cell: ms, and in brackets the fraction of the experts' time. The
mixing FLOPs (4*G*S*E*p*D forward) against the experts' (4*E*G*p*D*H) are
printed beside them: the share of the mixes that no implementation of
Soft MoE can avoid. The CPU's ISA is printed.

Usage: python benchmarks/soft_moe_phases.py [--shapes S32 B16] [--k 1 2] [--repeats 5] [--threads 2] [--compile]
"""
from __future__ import annotations

import argparse
import platform

import torch
from moe_layer import SOFT_SHAPES, timed

from vmoe_torch import MoeMlp, RoutingConfig
from vmoe_torch.moe.dispatch import SoftDispatcher, round_to_bfloat16
from vmoe_torch.moe.metrics_switch import routing_metrics
from vmoe_torch.moe.soft import soft_router_logits, soft_weights

E = 8
NAMES = ("router", "dispatch", "combine", "bf16_round", "experts", "layer")


def phases(shape: str, k: int, compiled: bool = False) -> tuple[dict, int, float]:
    size, groups, dim, hidden = SOFT_SHAPES[shape]
    slots = max(1, round(size * k * 1.05 / E))
    torch.manual_seed(0)
    layer = MoeMlp(dim, hidden, E, RoutingConfig(router="soft", num_slots=slots, capacity_factor=None),
                   group_size=size).train()
    mu, scale = layer.router.mu, layer.router.scale
    x = torch.randn(groups, size, dim, requires_grad=True)
    buf = torch.randn(E, groups * slots, dim, requires_grad=True)
    with torch.no_grad():
        dsp, cmb = soft_weights(soft_router_logits(x, mu, scale)[0])
    dsp, cmb = dsp.requires_grad_(), cmb.requires_grad_()

    def run_router():
        d, c = soft_weights(soft_router_logits(x, mu, scale)[0])
        (d.sum() + c.square().sum()).backward()

    def run_dispatch():
        SoftDispatcher(dsp, cmb).dispatch(x).square().mean().backward()

    def run_combine():
        SoftDispatcher(dsp, cmb).combine(buf).square().mean().backward()

    def run_round():
        (round_to_bfloat16(x).square().mean() + round_to_bfloat16(buf).square().mean()).backward()

    def run_experts(experts=layer.experts):
        experts(buf).square().mean().backward()

    def run_layer(module=layer):
        with routing_metrics(False):
            y, _ = module(x)
            y.square().mean().backward()

    fns = dict(zip(NAMES, (run_router, run_dispatch, run_combine, run_round, run_experts, run_layer)))
    if compiled:
        torch._dynamo.reset()
        layer_c, experts_c = torch.compile(layer, fullgraph=True), torch.compile(layer.experts, fullgraph=True)
        fns["experts_c"] = lambda: run_experts(experts_c)
        fns["layer_c"] = lambda: run_layer(layer_c)
    mix_flops = 4 * groups * size * E * slots * dim
    expert_flops = 4 * E * groups * slots * dim * hidden
    return fns, slots, mix_flops / expert_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SOFT_SHAPES), choices=list(SOFT_SHAPES))
    ap.add_argument("--k", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time the layer and its experts compiled")
    args = ap.parse_args()
    names = NAMES + (("experts_c", "layer_c") if args.compile else ())
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {args.threads} threads, fp32, E={E}, median of {args.repeats}")
    print("| shape | matched K | p | " + " | ".join(names) + " | mix FLOPs / expert FLOPs "
          "| phases / (layer - experts) |" + (" layer_c / experts_c |" if args.compile else ""))
    print("|---|---|---|" + "---|" * (len(names) + 2 + args.compile))
    for shape in args.shapes:
        for k in args.k:
            fns, slots, flop_share = phases(shape, k, args.compile)
            t = timed(fns, args.repeats)
            exp = t["experts"]
            cells = [f"{t[n] * 1e3:.2f} ({t[n] / exp:.3f})" for n in names]
            parts = sum(t[n] for n in NAMES[:4])
            share = f"{parts / (t['layer'] - exp):.2f}" if t["layer"] > exp else "n/a"
            compiled = f" {t['layer_c'] / t['experts_c']:.3f} |" if args.compile else ""
            print(f"| {shape} {SOFT_SHAPES[shape]} | {k} | {slots} | " + " | ".join(cells)
                  + f" | {flop_share:.3f} | {share} |" + compiled, flush=True)


if __name__ == "__main__":
    main()
