"""Where an MoE layer's time goes besides its experts: each routing phase
timed on its own, forward + backward where it has a gradient, in fp32 and
bf16 (autocast, as training runs it), with the expert MLP as the yardstick.

Phases (top-K layer, E=8, K=2, C=1.05, BPR on):
  router     router matmul + softmax (float32, outside autocast)
  noise      the counter-based per-group normal draw and its addition
  noise_prev the same draw as computed before the per-element hashes were
             cached (kept here only, for the before/after in one run)
  topk_bpr   top-K of the gates, the BPR priority sort
  capacity   slot assignment (positions within each expert's buffer)
  dispatch   building the index dispatcher and gathering the buffers
  combine    gathering each token's K slots (dropped ones read zeros), weighting
  dispatch_prev, combine_prev  the same with the dispatcher as it was before
             its backward became a gather (`IndexDispatcherPrev` below: the
             backward of each gather a scatter-add, and a masking pass in
             the combine; same bits for K <= 2)
  losses     importance + load auxiliary losses
  metrics    the per-group routing statistics (dropped fraction, load, ...)
  soft_norm  Soft MoE: normalised logits and both softmaxes (p = 6, E = 8)
  soft_metrics  Soft MoE: the reference's similarity metrics
  experts    the expert MLP on the (E, G*C, D) buffers (the yardstick)
  layer      the whole top-K layer (MoeMlp), metrics on
  layer_lean the whole top-K layer with metrics off (`routing_metrics(False)`,
             what the trainer does on steps it does not log)
  layer_prev the whole layer as it ran before this issue's cuts: statistics
             on every step, the previous noise draw and the previous
             dispatcher (what every training step paid); layer_prev -
             layer_lean is what the cuts saved

Every backward starts from a dense gradient (`.square().mean()`), as in a
model, where the next layer hands back a contiguous gradient. An earlier
version ended some phases with `.sum()`, whose backward hands on a stride-0
(expanded) gradient; on it torch's bmm in the combine's backward loops over
the T matrices one by one (32,000 select / clone / copy calls in 10 runs),
and the combine measured about 9 ms instead of about 6 at S/32.

Each phase is reported in ms and as a fraction of the experts' time; the
sum of the top-K phases against layer - experts tells how much of the
overhead the phases account for. The overhead before and after (layer_prev
and layer_lean minus the experts) is the median of back-to-back
differences within each repeat (`moe_layer.paired_difference`), not the
difference of two medians. The CPU's ISA is printed, so that runs on
different machines can be read side by side.

Usage: python benchmarks/moe_phases.py [--shapes demo S32 B16] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import platform
import statistics

import torch
from moe_layer import paired_difference, timed_runs  # benchmarks/moe_layer.py's interleaved repeats

from vmoe_torch import MoeMlp, RoutingConfig
from vmoe_torch.moe import noise as noise_module
from vmoe_torch.moe import routers as routers_module
from vmoe_torch.moe.dispatch import IndexDispatcher, gate_weighted_sum
from vmoe_torch.moe.metrics_switch import routing_metrics
from vmoe_torch.moe.noise import MASK32, _uniform, group_normal, hash32, seed_words
from vmoe_torch.moe.routers import routing_stats
from vmoe_torch.moe.routing import (
    importance_loss,
    load_loss,
    positions_within_expert,
    priority_scores,
    sorted_top_k,
    top_experts_per_item,
)
from vmoe_torch.moe.soft import soft_metrics, soft_router_logits, soft_weights

SHAPES = {  # name: (group_size, groups, D, H)
    "demo": (800, 2, 64, 256),
    "S32": (400, 4, 512, 2048),
    "B16": (1576, 4, 768, 3072),
}
E, K, CF = 8, 2, 1.05


def group_normal_prev(seed, first_group, groups, shape):
    """The draw as `moe.noise.group_normal` computed it before its
    per-element hashes were cached: four hash passes per call (same bits)."""
    n = math.prod(shape)
    key = hash32(hash32(seed[0]) ^ seed[1])
    g = torch.arange(groups, dtype=torch.int64) + first_group
    gkey = hash32(key ^ hash32(g & MASK32)).unsqueeze(1)
    i = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    u1 = _uniform(hash32(gkey ^ hash32((2 * i) & MASK32)))
    u2 = _uniform(hash32(gkey ^ hash32((2 * i + 1) & MASK32)))
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).view(groups, *shape)


class IndexDispatcherPrev(IndexDispatcher):
    """`IndexDispatcher` as it was before its gathers got gather backwards
    (kept here only, for the before/after in one run): torch's index_select,
    whose backward is a scatter-add, with a masking pass over the combine's
    (G*S*K, D) rows."""

    def __init__(self, routing) -> None:
        super().__init__(routing)
        num_slots = self.num_experts * self.groups * self.capacity
        kept = self.token_slot.reshape(-1) < num_slots
        self.token_slot_prev = torch.where(kept, self.token_slot.reshape(-1), 0)
        self.dropped = ~kept.view(-1, 1)

    def dispatch(self, x):
        dim = x.shape[-1]
        x = torch.cat([x.reshape(-1, dim), x.new_zeros(1, dim)])
        return x.index_select(0, self.slot_token).view(self.num_experts, self.groups * self.capacity, dim)

    def combine(self, y):
        gathered = y.reshape(-1, y.shape[-1]).index_select(0, self.token_slot_prev)
        return gate_weighted_sum(gathered.masked_fill(self.dropped, 0.0), self.weights)


@contextlib.contextmanager
def previous_dispatcher():
    """Routers build `IndexDispatcherPrev` inside the block."""
    current = routers_module.IndexDispatcher
    routers_module.IndexDispatcher = IndexDispatcherPrev
    try:
        yield
    finally:
        routers_module.IndexDispatcher = current


def phases(shape: str, bf16: bool) -> dict:
    size, groups, dim, hidden = SHAPES[shape]
    torch.manual_seed(0)
    layer = MoeMlp(dim, hidden, E, RoutingConfig(num_selected_experts=K, capacity_factor=CF, batch_priority=True),
                   group_size=size).train()
    layer.noise_seed = 0
    router = layer.router
    cap = layer.capacity_for(size)
    x = torch.randn(groups, size, dim, requires_grad=True)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    logits = router.logits(x.detach())
    gates = torch.softmax(logits, -1)
    top_gates, expert_index = sorted_top_k(gates, K)
    plan = top_experts_per_item(gates, K, cap, True)
    buf = torch.randn(E, groups * cap, dim, requires_grad=True)
    seed = seed_words(0)
    soft = MoeMlp(dim, hidden, E, RoutingConfig(router="soft", num_slots=6, capacity_factor=None),
                  group_size=size).train()
    xs = torch.randn(groups, size, dim, requires_grad=True)

    def run_router():
        with amp():
            torch.softmax(router.logits(x), -1).square().mean().backward()

    def run_noise():
        logits + (1.0 / E) * group_normal(seed, 0, groups, (size, E))

    def run_noise_prev():
        logits + (1.0 / E) * group_normal_prev(seed, 0, groups, (size, E))

    def run_topk():
        t, _ = sorted_top_k(gates, K)
        torch.sort(priority_scores(t), dim=1, descending=True, stable=True)

    def run_capacity():
        positions_within_expert(expert_index.transpose(1, 2).reshape(groups, K * size), E)

    def run_dispatch(cls=IndexDispatcher):
        def run():
            with amp():
                d = cls(plan)
                d.dispatch(x).float().square().mean().backward()
        return run

    weights = plan.combine_weights.detach().requires_grad_()

    def run_combine(cls=IndexDispatcher):
        d_fixed = cls(plan)

        def run():
            with amp():
                d_fixed.weights = weights * plan.kept
                d_fixed.combine(buf).float().square().mean().backward()
        return run

    def run_losses():
        lg = logits.detach().requires_grad_()
        noisy = lg + 0.1
        (importance_loss(torch.softmax(lg, -1)) + load_loss(lg, noisy, 1.0 / E, K)).sum().backward()

    def run_metrics():
        routing_stats(plan, E)

    def run_soft_norm():
        with amp():
            lg, _ = soft_router_logits(xs.float(), soft.router.mu.float(), soft.router.scale.float())
            dsp, cmb = soft_weights(lg)
            (dsp.sum() + cmb.square().sum()).backward()

    with torch.no_grad():
        lg_s, mu_s = soft_router_logits(xs.float(), soft.router.mu.float(), soft.router.scale.float())
        dsp_s, cmb_s = soft_weights(lg_s)

    def run_soft_metrics():
        soft_metrics(dsp_s, cmb_s, mu_s)

    def run_experts():
        with amp():
            layer.experts(buf).float().square().mean().backward()

    def run_layer(metrics_on: bool):
        def run():
            with amp(), routing_metrics(metrics_on):
                y, m = layer(x)
                (y.float().square().mean() + m["auxiliary_loss"]).backward()
        return run

    def run_layer_prev():
        current = noise_module.group_normal
        noise_module.group_normal = group_normal_prev
        try:
            with previous_dispatcher():
                run_layer(True)()
        finally:
            noise_module.group_normal = current
    fns = {"router": run_router, "noise": run_noise, "noise_prev": run_noise_prev, "topk_bpr": run_topk,
           "capacity": run_capacity,
           "dispatch": run_dispatch(), "combine": run_combine(),
           "dispatch_prev": run_dispatch(IndexDispatcherPrev), "combine_prev": run_combine(IndexDispatcherPrev),
           "losses": run_losses, "metrics": run_metrics,
           "soft_norm": run_soft_norm, "soft_metrics": run_soft_metrics, "experts": run_experts,
           "layer": run_layer(True), "layer_lean": run_layer(False), "layer_prev": run_layer_prev}
    return fns


def share(part: float, whole: float) -> str:
    """part / whole, or n/a where the whole (a difference of timings) is not positive."""
    return f"{part / whole:.2f}" if whole > 0 else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, torch {torch.__version__}, "
          f"{args.threads} threads; E={E}, K={K}, C={CF}, BPR; median of {args.repeats}")
    names = ["router", "noise", "topk_bpr", "capacity", "dispatch", "combine", "losses", "metrics", "soft_norm",
             "soft_metrics", "noise_prev", "dispatch_prev", "combine_prev", "experts", "layer", "layer_lean",
             "layer_prev"]
    print("| shape | dtype | " + " | ".join(names) + " | top-K phases / (layer - experts) "
          "| overhead before: layer_prev - experts | after: layer_lean - experts | after / before |")
    print("|---|---|" + "---|" * (len(names) + 4))
    for shape in args.shapes:
        for bf16 in (False, True):
            runs = timed_runs(phases(shape, bf16), args.repeats)
            t = {name: statistics.median(ts) for name, ts in runs.items()}
            exp = t["experts"]
            cells = [f"{t[n] * 1e3:.2f} ({t[n] / exp:.3f})" for n in names]
            topk = sum(t[n] for n in names[:8])
            before = paired_difference(runs, "layer_prev", "experts")
            after = paired_difference(runs, "layer_lean", "experts")
            print(f"| {shape} {SHAPES[shape]} | {'bf16' if bf16 else 'fp32'} | " + " | ".join(cells)
                  + f" | {share(topk, t['layer'] - exp)} | {before * 1e3:.2f} ({before / exp:.3f}) "
                  f"| {after * 1e3:.2f} ({after / exp:.3f}) | {share(after, before)} |", flush=True)


if __name__ == "__main__":
    main()
