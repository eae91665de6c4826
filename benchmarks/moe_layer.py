"""One MoE layer, forward + backward, fp32 on the CPU (median of repeats).

Prints, per shape, three timings measured in the same run:
  moe      our MoeMlp (router + index dispatch + experts + combine)
  experts  the batched expert MLP alone on the same number of buffer slots
           (E, G*C, D): the floor any MoE layer pays
  einsum   the same MoeMlp with the reference's dense einsum dispatch
and the ratios moe/experts (target <= 1.15) and einsum/moe (target >= 1.5
at B/16 shapes).

Soft MoE rows (same run): the Soft MoE layer with one image per routing
group (the paper's setting) and p slots per expert matched to the sparse
layer's compute (E*p ~ tokens * K * 1.05), against the expert MLP alone on
its E*G*p slots. Soft MoE adds two dense (S x E*p) mixing matmuls per group
and the bfloat16 rounding the reference applies around the experts. The
"no statistics" column runs the same layer under `routing_metrics(False)`
(the reference's similarity metrics skipped, as the trainer does on the
steps it does not log): the previous behaviour is the first column.

Dropless rows (`--dropless-only`, same run): the layer at C = 1.05 against
the same layer with `dropless=True` (every choice kept, rows sorted by expert,
grouped matmuls), the dropless layer with its fallback loop over experts, and
the expert MLP alone on exactly the G*S*K routed rows (grouped matmuls): the
floor of any capacity-free layer.

E^3 rows (`--e3-only`): the E^3 layer (M=2 members, each routing among its
own E/2 experts; members interleaved in every group, the reference's layout)
against the top-K layer on the same tokens with the same E, K and C, and the
expert MLP alone on their (E, G*C, D) buffers; statistics off in both (as on
the trainer's unlogged steps).

Usage: python benchmarks/moe_layer.py [--repeats 5] [--shapes S32 B16] [--threads 2]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from vmoe_torch import MoeMlp, RoutingConfig
from vmoe_torch.moe.metrics_switch import routing_metrics

SHAPES = {  # name: (group_size, groups, D, H)
    "S32": (400, 4, 512, 2048),
    "B16": (1576, 4, 768, 3072),
}


SOFT_SHAPES = {  # name: (tokens per image = group size, images, D, H)
    "S32": (49, 32, 512, 2048),
    "B16": (196, 32, 768, 3072),
}


def timed_runs(fns: dict, repeats: int) -> dict:
    """Seconds of every run of every function, one list per function. The
    functions are interleaved within each repeat, in an order shuffled per
    repeat (fixed seeds), so that clock and cache drift and the position in
    the sequence hit all of them alike; entry i of each list is repeat i."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns)
        random.Random(r).shuffle(order)
        for name in order:
            t = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t)
    return times


def timed(fns: dict, repeats: int) -> dict:
    """Median seconds per function (`timed_runs`)."""
    return {name: statistics.median(ts) for name, ts in timed_runs(fns, repeats).items()}


def paired_difference(runs: dict, a: str, b: str) -> float:
    """Median over repeats of run a minus run b of the same repeat: a
    difference read from back-to-back pairs, which slow drift of the
    machine's speed moves less than the difference of two medians."""
    return statistics.median(x - y for x, y in zip(runs[a], runs[b]))


def bench(shape: str, experts: int, k: int, repeats: int) -> dict:
    group_size, groups, dim, hidden = SHAPES[shape]
    torch.manual_seed(0)
    layer = MoeMlp(dim, hidden, experts, num_selected_experts=k, capacity_factor=1.05,
                   group_size=group_size).train()
    x = torch.randn(groups, group_size, dim, requires_grad=True)
    capacity = layer.capacity_for(group_size)
    buf = torch.randn(experts, groups * capacity, dim, requires_grad=True)

    def run_moe():
        y, m = layer(x)
        (y.square().mean() + m["auxiliary_loss"]).backward()

    def run_experts():
        layer.experts(buf).square().mean().backward()

    def run_einsum():
        layer.dispatch_impl = "einsum"
        try:
            run_moe()
        finally:
            layer.dispatch_impl = "index"

    t = timed({"moe": run_moe, "experts": run_experts, "einsum": run_einsum}, repeats)
    t_moe, t_exp, t_ein = t["moe"], t["experts"], t["einsum"]
    return dict(shape=shape, E=experts, K=k, C=capacity, moe_ms=t_moe * 1e3, experts_ms=t_exp * 1e3,
                einsum_ms=t_ein * 1e3, moe_over_experts=t_moe / t_exp, einsum_over_moe=t_ein / t_moe)


def bench_soft(shape: str, experts: int, k: int, repeats: int) -> dict:
    group_size, groups, dim, hidden = SOFT_SHAPES[shape]
    slots = max(1, round(group_size * k * 1.05 / experts))
    torch.manual_seed(0)
    layer = MoeMlp(dim, hidden, experts, RoutingConfig(router="soft", num_slots=slots,
                                                       capacity_factor=None),
                   group_size=group_size).train()
    x = torch.randn(groups, group_size, dim, requires_grad=True)
    buf = torch.randn(experts, groups * slots, dim, requires_grad=True)

    def run_soft():
        y, _ = layer(x)
        y.square().mean().backward()

    def run_experts():
        layer.experts(buf).square().mean().backward()

    def run_soft_fp32():  # without the reference's bfloat16 rounding around the experts
        layer.set_routing(bfloat16_dispatch=False)
        try:
            run_soft()
        finally:
            layer.set_routing(bfloat16_dispatch=None)

    def run_soft_lean():  # the statistics skipped, as the trainer runs the steps it does not log
        with routing_metrics(False):
            run_soft()

    t = timed({"soft": run_soft, "experts": run_experts, "soft32": run_soft_fp32, "lean": run_soft_lean}, repeats)
    return dict(shape=shape, E=experts, K=k, p=slots, soft_ms=t["soft"] * 1e3,
                experts_ms=t["experts"] * 1e3, soft32_ms=t["soft32"] * 1e3, lean_ms=t["lean"] * 1e3,
                soft_over_experts=t["soft"] / t["experts"], soft32_over_experts=t["soft32"] / t["experts"],
                lean_over_experts=t["lean"] / t["experts"])


def bench_dropless(shape: str, experts: int, k: int, repeats: int) -> dict:
    from vmoe_torch.moe import experts as experts_module
    group_size, groups, dim, hidden = SHAPES[shape]
    torch.manual_seed(0)
    layer = MoeMlp(dim, hidden, experts, num_selected_experts=k, capacity_factor=1.05,
                   group_size=group_size).train()
    layer.noise_seed = 0
    x = torch.randn(groups, group_size, dim, requires_grad=True)
    rows = groups * group_size * k
    counts = torch.full((experts,), rows // experts)
    counts[: rows % experts] += 1
    offsets = counts.cumsum(0).to(torch.int32)
    row_expert = torch.repeat_interleave(torch.arange(experts), counts)
    buf = torch.randn(rows, dim, requires_grad=True)

    def run(dropless: bool):
        layer.set_routing(dropless=dropless)
        y, m = layer(x)
        (y.square().mean() + m["auxiliary_loss"]).backward()

    def run_loop():
        ok = experts_module._grouped_mm_ok
        experts_module._grouped_mm_ok = lambda t: False
        try:
            run(True)
        finally:
            experts_module._grouped_mm_ok = ok

    def run_rows():
        layer.experts.forward_grouped(buf, offsets, row_expert).square().mean().backward()

    t = timed({"capacity": lambda: run(False), "dropless": lambda: run(True), "loop": run_loop,
               "rows": run_rows}, repeats)
    return dict(shape=shape, E=experts, K=k, C=layer.capacity_for(group_size), cap_ms=t["capacity"] * 1e3,
                dropless_ms=t["dropless"] * 1e3, loop_ms=t["loop"] * 1e3, rows_ms=t["rows"] * 1e3,
                dropless_over_cap=t["dropless"] / t["capacity"], dropless_over_rows=t["dropless"] / t["rows"],
                loop_over_dropless=t["loop"] / t["dropless"])


def bench_e3(shape: str, experts: int, k: int, repeats: int) -> dict:
    group_size, groups, dim, hidden = SHAPES[shape]
    torch.manual_seed(0)
    layers = {m: MoeMlp(dim, hidden, experts, num_selected_experts=k, capacity_factor=1.05,
                        group_size=group_size, ensemble_size=m).train() for m in (1, 2)}
    capacity = layers[2].capacity_for(group_size)
    assert capacity == layers[1].capacity_for(group_size)
    x = torch.randn(groups, group_size, dim, requires_grad=True)  # (B*M, N, D): G rows of S tokens
    buf = torch.randn(experts, groups * capacity, dim, requires_grad=True)

    def run(m: int):
        def step():
            with routing_metrics(False):
                y, _ = layers[m](x)
                y.square().mean().backward()
        return step

    def run_experts():
        layers[1].experts(buf).square().mean().backward()

    t = timed({"topk": run(1), "e3": run(2), "experts": run_experts}, repeats)
    return dict(shape=shape, E=experts, K=k, C=capacity, e3_ms=t["e3"] * 1e3, topk_ms=t["topk"] * 1e3,
                experts_ms=t["experts"] * 1e3, e3_over_experts=t["e3"] / t["experts"],
                topk_over_experts=t["topk"] / t["experts"], e3_over_topk=t["e3"] / t["topk"])


E3_TABLE = ("| E^3 shape | E | K | C | E^3 layer, M=2 (ms) | top-K layer (ms) | expert MLP alone (ms) "
            "| E^3 / experts | top-K / experts | E^3 / top-K |",
            ("shape", "E", "K", "C", "e3_ms", "topk_ms", "experts_ms", "e3_over_experts", "topk_over_experts",
             "e3_over_topk"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--experts", nargs="+", type=int, default=[8, 32])
    ap.add_argument("--k", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--soft-only", action="store_true", help="only the Soft MoE rows")
    ap.add_argument("--dropless-only", action="store_true", help="only the dropless rows")
    ap.add_argument("--e3-only", action="store_true", help="only the E^3 rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, median of {args.repeats}; "
          f"CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    if args.dropless_only:
        _table(args, bench_dropless, DROPLESS_TABLE)
        return
    if args.e3_only:
        _table(args, bench_e3, E3_TABLE)
        return
    if not args.soft_only:
        sparse_rows(args)
    print()
    soft_rows(args)
    if not args.soft_only:
        print()
        _table(args, bench_dropless, DROPLESS_TABLE)


SPARSE_TABLE = ("| shape | E | K | C | MoE layer (ms) | expert MLP alone (ms) | einsum MoE (ms) "
                "| MoE / experts | einsum / MoE |",
                ("shape", "E", "K", "C", "moe_ms", "experts_ms", "einsum_ms", "moe_over_experts",
                 "einsum_over_moe"))
SOFT_TABLE = ("| Soft MoE shape | E | matched K | slots p | Soft MoE layer (ms) | expert MLP alone (ms) "
              "| Soft MoE, fp32 dispatch (ms) | Soft MoE, no statistics (ms) | Soft MoE / experts "
              "| fp32 dispatch / experts | no statistics / experts |",
              ("shape", "E", "K", "p", "soft_ms", "experts_ms", "soft32_ms", "lean_ms", "soft_over_experts",
               "soft32_over_experts", "lean_over_experts"))

DROPLESS_TABLE = ("| dropless shape | E | K | C (capacity path) | C=1.05 layer (ms) | dropless layer (ms) "
                  "| dropless, loop fallback (ms) | expert MLP on the routed rows (ms) | dropless / C=1.05 "
                  "| dropless / rows | loop / grouped |",
                  ("shape", "E", "K", "C", "cap_ms", "dropless_ms", "loop_ms", "rows_ms", "dropless_over_cap",
                   "dropless_over_rows", "loop_over_dropless"))


def sparse_rows(args: argparse.Namespace) -> None:
    _table(args, bench, SPARSE_TABLE)


def soft_rows(args: argparse.Namespace) -> None:
    _table(args, bench_soft, SOFT_TABLE)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


def _table(args: argparse.Namespace, fn, table) -> None:
    header, keys = table
    print(header)
    print("|" + "---|" * len(keys))
    for shape in args.shapes:
        for e in args.experts:
            for k in args.k:
                r = fn(shape, e, k, args.repeats)
                print("| " + " | ".join(_cell(r[key]) for key in keys) + " |", flush=True)


if __name__ == "__main__":
    main()
