"""Expert parallelism on CPU gloo processes.

For W in {1, 2, 4} processes on a fixed global batch, prints:
- the bytes each all_to_all sends to other ranks, against the theoretical
  count (buffer rows x D x 4 bytes x (W-1)/W; with fixed capacity the rows
  are the E*G*C buffer slots of the rank's groups);
- the median training-step time (forward, backward, gradient sync, SGD).

Usage: python benchmarks/expert_parallel.py [--steps 5] [--worlds 1 2 4]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vmoe_torch import create_model
from vmoe_torch.distributed import expert_parallel, sync_gradients
from vmoe_torch.distributed.runtime import shutdown

BATCH, IMAGE = 32, 64
MODEL = dict(num_classes=10, image_size=IMAGE, patch_size=8, hidden_size=256, num_heads=4, mlp_dim=1024,
             num_layers=4, layers=(1, 3), num_experts=8, num_selected_experts=2, group_size=8 * 65,
             representation_size=None, bfloat16_dispatch=False)


def worker(rank: int, world: int, init: str, out: str, steps: int, threads: int) -> None:
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model("ViT-S/32, E=8, K=2, Every 2", **MODEL).train()
    sent: list[int] = []
    if world > 1:
        expert_parallel(model)
        original = dist.all_to_all_single

        def counting(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
            if input.dim() == 2:  # token rows (skip the count exchanges)
                row = input.shape[1] * input.element_size()
                splits = input_split_sizes or [input.shape[0] // world] * world
                sent.append(sum(s for r, s in enumerate(splits) if r != rank) * row)
            return original(output, input, output_split_sizes, input_split_sizes, group, **kw)
        dist.all_to_all_single = counting
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(2))
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    times = []
    for step in range(steps + 1):
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        logits, metrics = model(x[share], return_metrics=True)
        (F.cross_entropy(logits, y[share]) + metrics["auxiliary_loss"]).backward()
        if world > 1:
            sync_gradients(model)
        opt.step()
        opt.zero_grad()
        if world > 1:
            dist.barrier()
        if step:
            times.append(time.perf_counter() - t)
    layer = next(iter(model.moe_layers().values()))
    tokens = (BATCH // world) * model.config.tokens_per_image
    capacity = layer.capacity_for(layer.group_size)
    slots = MODEL["num_experts"] * (tokens // layer.group_size) * capacity
    theory = slots * MODEL["hidden_size"] * 4 * (world - 1) / world
    per_call = sent[: 2 * len(model.moe_layers())]  # first step's forward: 2 exchanges per layer
    with open(os.path.join(out, f"{world}_{rank}.json"), "w") as f:
        json.dump({"step_s": statistics.median(times), "bytes_per_all_to_all": per_call[0] if per_call else 0,
                   "theory": theory, "slots": slots, "tokens": tokens}, f)
    if world > 1:
        shutdown(synchronize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    print(f"global batch {BATCH} images of {IMAGE}px, D={MODEL['hidden_size']}, E={MODEL['num_experts']}, "
          f"K={MODEL['num_selected_experts']}, {args.cores} cores shared by all processes")
    print("| processes | step time (s) | speed-up vs 1 | bytes per all_to_all (to other ranks) "
          "| theoretical | ratio |")
    print("|---|---|---|---|---|---|")
    base = None
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as d:
            threads = max(1, args.cores // world)
            mp.spawn(worker, args=(world, os.path.join(d, "init"), d, args.steps, threads), nprocs=world)
            r = json.load(open(os.path.join(d, f"{world}_0.json")))
        base = base or r["step_s"]
        ratio = r["bytes_per_all_to_all"] / r["theory"] if r["theory"] else float("nan")
        print(f"| {world} | {r['step_s']:.3f} | {base / r['step_s']:.2f} | {r['bytes_per_all_to_all']:,} "
              f"| {r['theory']:,.0f} | {ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
