"""The optimal-transport routers' cost: one MoE layer, forward + backward,
fp32 on the CPU (median of repeats, the rows interleaved in each repeat),
against top-K routing in the same run.

Rows per shape: `top_experts` (K=2, C=1.05) and `expert_choice` (C=2.1, the
same buffer slots) as the baselines, then each OT router at its flavour's
baseline setting (tokens choose: K=2, C=1.05; experts choose: C=2.1) and its
reference defaults (20 solver iterations; Sinkhorn 20; L-BFGS 20). The
ratio column is the layer's time over its flavour's baseline; `router ms`
times the router alone (logits, plan, dispatch plan), forward only.

Usage: python benchmarks/ot_routing.py [--repeats 5] [--shapes demo S32] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import platform

import torch
from moe_layer import timed  # the interleaved-repeats median of benchmarks/moe_layer.py

from vmoe_torch import MoeMlp, RoutingConfig

SHAPES = {  # name: (group_size, groups, D, H, E)
    "demo": (800, 2, 64, 256, 8),
    "S32": (400, 4, 512, 2048, 8),
}
ROWS = [("top_experts", "top_experts", {}), ("expert_choice", "expert_choice", {}),
        ("ot_ksparse_tc", "top_experts", {}), ("ot_kl_tc", "top_experts", {}),
        ("ot_kl_tc (L-BFGS)", "top_experts", {"ot_lbfgs": True}),
        ("ot_sparse_ec", "expert_choice", {}), ("ot_ksparse_ec", "expert_choice", {}),
        ("ot_kl_ec", "expert_choice", {})]


def _config(name: str, extra: dict) -> RoutingConfig:
    router = name.split(" ")[0]
    tokens_choose = router in ("top_experts", "ot_ksparse_tc", "ot_kl_tc")
    return RoutingConfig(router=router, num_selected_experts=2 if tokens_choose else 1,
                         capacity_factor=1.05 if tokens_choose else 2.1, **extra)


def bench(shape: str, repeats: int) -> list[dict]:
    group_size, groups, dim, hidden, experts = SHAPES[shape]
    x = torch.randn(groups, group_size, dim, requires_grad=True)
    layers = {}
    for name, _, extra in ROWS:
        torch.manual_seed(0)
        layers[name] = MoeMlp(dim, hidden, experts, _config(name, extra), group_size=group_size).train()

    def step(layer: MoeMlp):
        def run():
            y, m = layer(x)
            (y.square().mean() + m["auxiliary_loss"]).backward()
        return run

    def route(layer: MoeMlp):
        def run():
            with torch.no_grad():
                layer.router(x)
        return run
    fns = {name: step(layer) for name, layer in layers.items()}
    fns.update({f"router {name}": route(layer) for name, layer in layers.items()})
    t = timed(fns, repeats)
    return [dict(shape=shape, router=name, ms=t[name] * 1e3, router_ms=t[f"router {name}"] * 1e3,
                 ratio=t[name] / t[base]) for name, base, _ in ROWS]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {args.threads} threads of {os.cpu_count()} cores; "
          f"median of {args.repeats}")
    print("| shape (S, G, D, H, E) | router | layer fwd+bwd ms | / its baseline | router fwd ms |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        for r in bench(shape, args.repeats):
            print(f"| {shape} {SHAPES[shape]} | {r['router']} | {r['ms']:.2f} | {r['ratio']:.2f} | "
                  f"{r['router_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
