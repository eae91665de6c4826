"""What torch.compile does to the MoE layer's routing overhead, read from
the generated code as well as the clock.

For each shape and dtype, four functions run interleaved (shuffled order
per repeat, `moe_layer.timed_runs`), forward + backward from a dense
gradient as in a model:
  experts     the expert MLP on (E, G*C, D) buffers, eager (the yardstick)
  experts_c   the same, torch.compile (inductor, fullgraph)
  layer       the whole top-K layer (E=8, K=2, C=1.05, BPR, seeded noise,
              statistics off as on unlogged training steps), eager
  layer_c     the same layer, torch.compile (inductor, fullgraph)
  layer_prev, layer_prev_c  the layer with the dispatcher as it was before
              its gathers got gather backwards (`moe_phases.IndexDispatcherPrev`:
              torch's index_select, whose backward is a scatter-add), eager
              and compiled: the before/after in one run
The overhead (layer minus experts) is the median of back-to-back
differences within each repeat, eager and compiled.

From the code inductor generated for the compiled layer (forward and
backward, `torch._inductor.utils.run_and_get_code`) it counts the calls
into ATen's kernels (`extern_kernels.bmm` and the like: the GEMMs that
inductor leaves to the same library calls as eager; `aten.sort` and the
like: operators it does not lower and calls as they are, our own
custom operators among them), the fused C++ kernels
it wrote itself, the atomic adds in those (inductor's lowering of a
scatter-add, such as torch's backward of a gather), and, with --max-autotune, how many GEMMs went to inductor's
C++ GEMM templates instead of ATen (autotuning times both and keeps the
faster). `fullgraph=True` compiles, so the layer is one graph with no breaks.

Usage: python benchmarks/compile_layer.py [--shapes demo S32 B16] [--repeats 15] [--max-autotune]
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import re
import statistics

import torch
from moe_layer import paired_difference, timed_runs  # benchmarks/moe_layer.py's interleaved repeats
from moe_phases import SHAPES, previous_dispatcher  # SHAPES: name -> (group_size, groups, D, H)
from torch._inductor.utils import run_and_get_code

from vmoe_torch import MoeMlp, RoutingConfig
from vmoe_torch.moe.metrics_switch import routing_metrics

E, K, CF = 8, 2, 1.05


def code_counts(code: list[str]) -> dict:
    """Kernel calls in inductor's generated code (forward + backward)."""
    text = "\n".join(code)
    extern = re.findall(r"extern_kernels\.(\w+)\(", text) + re.findall(r"\baten\.(\w+)\.\w+\(", text) \
        + re.findall(r"\bops\.vmoe_torch\.(\w+)\.\w+\(", text)
    return {
        "extern": {name: extern.count(name) for name in sorted(set(extern))},
        "fused": len(set(re.findall(r"\bcpp_fused_\w+(?= = async_compile)", text))),
        "templates": len(set(re.findall(r"\bcpp_\w*[Gg]emm\w*(?= = async_compile)", text))),
        "atomic": len(re.findall(r"\batomic_add\w*", text)),
    }


def functions(shape: str, bf16: bool, mode: str | None) -> tuple[dict, dict]:
    size, groups, dim, hidden = SHAPES[shape]
    torch.manual_seed(0)
    layer = MoeMlp(dim, hidden, E, RoutingConfig(num_selected_experts=K, capacity_factor=CF, batch_priority=True),
                   group_size=size).train()
    layer.noise_seed = 0
    x = torch.randn(groups, size, dim, requires_grad=True)
    buf = torch.randn(E, groups * layer.capacity_for(size), dim, requires_grad=True)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    torch._dynamo.reset()
    layer_c = torch.compile(layer, fullgraph=True, mode=mode)
    experts_c = torch.compile(layer.experts, fullgraph=True, mode=mode)

    def run_layer(module, prev=False):
        def run():
            with amp(), routing_metrics(False), (previous_dispatcher() if prev else contextlib.nullcontext()):
                y, metrics = module(x)
                (y.float().square().mean() + metrics["auxiliary_loss"]).backward()
        return run

    def run_experts(module):
        def run():
            with amp():
                module(buf).float().square().mean().backward()
        return run

    _, code = run_and_get_code(run_layer(layer_c))
    _, code_prev = run_and_get_code(run_layer(layer_c, prev=True))
    fns = {"experts": run_experts(layer.experts), "experts_c": run_experts(experts_c),
           "layer": run_layer(layer), "layer_c": run_layer(layer_c),
           "layer_prev": run_layer(layer, prev=True), "layer_prev_c": run_layer(layer_c, prev=True)}
    return fns, {"now": code_counts(code), "prev": code_counts(code_prev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["demo", "S32"], choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-autotune", action="store_true",
                    help="compile with mode='max-autotune' (inductor's C++ GEMM templates compete with ATen)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # Compile afresh: code loaded from inductor's caches is not shown to run_and_get_code.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    mode = "max-autotune" if args.max_autotune else None
    print(f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, torch {torch.__version__}, "
          f"{args.threads} threads; E={E}, K={K}, C={CF}, BPR; compile mode {mode or 'default'}; "
          f"median of {args.repeats}")
    print("| shape | dtype | experts / experts_c (ms) | layer / layer_c (ms) | layer_prev / layer_prev_c (ms) "
          "| compiled / eager speed, layer | overhead eager: prev -> now (ms, / experts) "
          "| overhead compiled: prev -> now (ms, / experts_c) | ATen and custom calls in the compiled layer "
          "| inductor's own kernels | atomic adds in them: prev -> now | GEMM templates chosen |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        for bf16 in (False, True):
            fns, counts = functions(shape, bf16, mode)
            runs = timed_runs(fns, args.repeats)
            t = {name: statistics.median(ts) * 1e3 for name, ts in runs.items()}

            def overhead(layer: str, experts: str) -> str:
                ms = paired_difference(runs, layer, experts) * 1e3
                return f"{ms:.2f} ({ms / t[experts]:.3f})"

            now, prev = counts["now"], counts["prev"]
            extern = ", ".join(f"{name} {n}" for name, n in now["extern"].items())
            dtype = "bf16" if bf16 else "fp32"
            print(f"| {shape} {SHAPES[shape]} | {dtype} | {t['experts']:.2f} / {t['experts_c']:.2f} "
                  f"| {t['layer']:.2f} / {t['layer_c']:.2f} | {t['layer_prev']:.2f} / {t['layer_prev_c']:.2f} "
                  f"| {t['layer'] / t['layer_c']:.3f} "
                  f"| {overhead('layer_prev', 'experts')} -> {overhead('layer', 'experts')} "
                  f"| {overhead('layer_prev_c', 'experts_c')} -> {overhead('layer_c', 'experts_c')} "
                  f"| {extern} | {now['fused']} | {prev['atomic']} -> {now['atomic']} | {now['templates']} |",
                  flush=True)


if __name__ == "__main__":
    main()
