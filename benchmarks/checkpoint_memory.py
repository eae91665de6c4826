"""Peak resident memory (RSS) of each rank while saving and loading a sharded
checkpoint, for FSDP2 + expert parallelism on W gloo processes.

Model: V-MoE with a ViT-S body (D=384, 12 blocks, MoE every 2nd block, E=8,
AdamW), about 78x the demo model's 0.91M parameters; images are 32 px so
the training step that allocates the optimizer state is quick.

Per rank it prints, in MB:
- baseline: RSS after the process group and one save/load round of a tiny
  model (the model-independent code, threads and buffers DCP uses), before
  the big model is built;
- shard: the rank's own parameter + optimizer-state bytes (local_bytes);
- save: peak RSS while `save_sharded_checkpoint` runs, minus the baseline,
  as a multiple of the shard (the shard itself is resident: 1.0x is the
  floor);
- load: the same for `restore`, in fresh processes as a resumed run is,
  into a freshly sharded model whose optimizer state is still empty (the
  loaded state is allocated during the load);
- export: rank 0 streaming the checkpoint to from_pretrained's single
  file, peak minus the RSS before it, against the largest single tensor.

For comparison, in the same run, one process holding the whole model and
optimizer state (what a full-state checkpoint gathers on rank 0) saving the
full layout: its peak minus baseline against the whole state.

Peaks are the kernel's VmHWM, reset (/proc/self/clear_refs) before each
phase. Linux only.

Usage: python benchmarks/checkpoint_memory.py [--worlds 2 4] [--smoke]
(--smoke: a small model, to check that the script runs; its ratios mean
nothing, the fixed overheads dominate.)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vmoe_torch import create_model
from vmoe_torch.distributed import fsdp
from vmoe_torch.distributed.runtime import shutdown
from vmoe_torch.models.loading import consolidate_checkpoint
from vmoe_torch.storage.pretrained import config_json
from vmoe_torch.train.checkpoint import restore, save_checkpoint, save_sharded_checkpoint

BIG = dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12, layers=(1, 3, 5, 7, 9, 11),
           num_experts=8, patch_size=8, image_size=32, num_classes=10, group_size=4 * 17)
TINY = dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, layers=(0, 1), num_experts=4,
            patch_size=8, image_size=32, num_classes=10, group_size=4 * 17)
MB = 2 ** 20


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> None:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so RSS is what is live
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak() -> int:
    return _status("VmHWM")


def _sharded(spec: dict, world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every1_e8_k2", **spec).train()
    if world > 1:
        fsdp.fsdp_expert_parallel(model, fsdp.parallel_mesh(world))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, world: int) -> None:
    logits, metrics = model(torch.randn(4, 3, 32, 32), return_metrics=True)
    (logits.square().mean() + metrics["auxiliary_loss"]).backward()
    if world > 1:
        fsdp.sync_expert_gradients(model)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _warm_up(root: str, world: int) -> int:
    """The code paths of a save and a load, on a tiny model; then the
    baseline RSS."""
    tiny, tiny_opt = _sharded(TINY, world)
    _step(tiny, tiny_opt, world)
    path = save_sharded_checkpoint(os.path.join(root, "tiny"), 1, tiny, tiny_opt, {}, keep=1)
    restore(path, tiny, tiny_opt)
    del tiny, tiny_opt
    reset_peak()
    return rss()


def worker(rank: int, world: int, init: str, root: str, out: str, phase: str, big: dict) -> None:
    """phase "save": train one step, save; phase "load" (fresh processes, as
    a resumed run): build the sharded model, restore; rank 0 then exports."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    baseline = _warm_up(os.path.join(root, f"warm-{phase}"), world)
    model, opt = _sharded(big, world)
    result = {"rank": rank, "baseline": baseline}
    path = os.path.join(root, "big", "checkpoints", "step_00000001")
    if phase == "save":
        _step(model, opt, world)
        params, state = fsdp.local_bytes(model, opt)
        result.update(params=params, state=state, shard=params + state)
        dist.barrier()
        reset_peak()
        save_sharded_checkpoint(os.path.join(root, "big"), 1, model, opt, {}, keep=1,
                                files={"config.json": config_json(model.config)})
        result["peak"] = peak()
    else:  # the optimizer state is not allocated yet: the load allocates it
        dist.barrier()
        reset_peak()
        restore(path, model, opt)
        result["peak"] = peak()
        del model, opt
        dist.barrier()
        if rank == 0:
            reset_peak()
            before_export = rss()
            consolidate_checkpoint(path, os.path.join(root, "exported"))
            result["export_extra"] = peak() - before_export
    with open(os.path.join(out, f"{phase}{rank}.json"), "w") as f:
        json.dump(result, f)
    shutdown(synchronize=True)


def full_layout(root: str, big: dict) -> dict[str, int]:
    """One process with the whole state, saving the full layout."""
    torch.set_num_threads(1)
    tiny, tiny_opt = _sharded(TINY, 1)
    _step(tiny, tiny_opt, 1)
    save_checkpoint(os.path.join(root, "tiny_full"), 1, tiny.state_dict(), tiny_opt.state_dict(), {}, keep=1)
    del tiny, tiny_opt
    reset_peak()
    baseline = rss()
    model, opt = _sharded(big, 1)
    _step(model, opt, 1)
    params, state = fsdp.local_bytes(model, opt)
    reset_peak()
    save_checkpoint(os.path.join(root, "full"), 1, model.state_dict(), opt.state_dict(), {}, keep=1)
    return {"baseline": baseline, "whole": params + state, "save_peak": peak()}


def _full_child(root: str, out: str, big: dict) -> None:
    with open(out, "w") as f:
        json.dump(full_layout(root, big), f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--smoke", action="store_true", help="a small model: checks that the script runs")
    args = ap.parse_args()
    big = {**BIG, "hidden_size": 64, "mlp_dim": 128, "num_heads": 2, "num_layers": 4, "layers": (1, 3)} \
        if args.smoke else BIG
    largest = max(p.numel() * 4 for p in create_model("vmoe_mi4_every1_e8_k2", **big).parameters())
    total = sum(p.numel() for p in create_model("vmoe_mi4_every1_e8_k2", **big).parameters())
    print(f"model: {total / 1e6:.1f}M parameters ({total / 914_826:.0f}x the demo model), AdamW; "
          f"largest tensor {largest / MB:.1f} MB")
    with tempfile.TemporaryDirectory() as root:
        out = os.path.join(root, "full.json")
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=_full_child, args=(os.path.join(root, "f"), out, big))
        p.start()
        p.join()
        with open(out) as f:
            r = json.load(f)
        print(f"one process, full layout: whole state {r['whole'] / MB:.0f} MB; save peak - baseline "
              f"{(r['save_peak'] - r['baseline']) / MB:.0f} MB = {(r['save_peak'] - r['baseline']) / r['whole']:.2f}x "
              "the whole state")
        print("| W | rank | shard MB (params + optimizer) | save: peak - baseline | load: peak - baseline | "
              "export: extra MB |")
        print("|---|---|---|---|---|---|")
        for world in args.worlds:
            wroot = os.path.join(root, f"w{world}")
            os.makedirs(wroot)
            results = {}
            for phase in ("save", "load"):
                init = os.path.join(root, f"init{world}{phase}")
                mp.spawn(worker, args=(world, init, wroot, wroot, phase, big), nprocs=world, join=True)
                results[phase] = []
                for rank in range(world):
                    with open(os.path.join(wroot, f"{phase}{rank}.json")) as f:
                        results[phase].append(json.load(f))
            for rank, (s, lo) in enumerate(zip(results["save"], results["load"])):
                shard = s["shard"]
                save, load = s["peak"] - s["baseline"], lo["peak"] - lo["baseline"]
                export = f"{lo['export_extra'] / MB:.1f}" if "export_extra" in lo else "-"
                print(f"| {world} | {rank} | {shard / MB:.0f} ({s['params'] / MB:.0f} + {s['state'] / MB:.0f}) | "
                      f"{save / MB:.0f} MB = {save / shard:.2f}x | {load / MB:.0f} MB = {load / shard:.2f}x | "
                      f"{export} |")

if __name__ == "__main__":
    main()
