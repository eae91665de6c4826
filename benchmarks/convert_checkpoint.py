"""Conversion time and peak memory for a B/16-size V-MoE checkpoint.

Builds a random "ViT-B/16, E=8, K=2, Every 2" model with the ImageNet-21k
head (the shape of vmoe_b16_imagenet21k_randaug_strong, ~1.2 GB in float32),
writes it in vmoe's native format with our exporter (4 shards, expert arrays
split per expert as an expert-sharded run would), then runs `vmoe convert`
and `from_pretrained` in fresh processes and reports their wall time and
peak resident memory (ru_maxrss), against the checkpoint size and against
the resident memory of a process that only imports the library.

Usage: python benchmarks/convert_checkpoint.py [--dir /tmp/vmoe_convert_bench]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time

IMPORT_ONLY = "import vmoe_torch, torch"
LOAD = ("import sys, vmoe_torch; m = vmoe_torch.from_pretrained(sys.argv[1]); "
        "print(sum(p.numel() for p in m.parameters()))")


def _child(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        raise RuntimeError("ru_maxrss did not grow: run each measurement in a fresh parent process")
    return seconds, peak * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/vmoe_convert_bench")
    ap.add_argument("--step", choices=["all", "write", "baseline", "convert", "load"], default="all")
    args = ap.parse_args()
    prefix, out = os.path.join(args.dir, "ckpt"), os.path.join(args.dir, "converted")
    if args.step in ("all", "write"):
        import torch

        from vmoe_torch import create_model
        from vmoe_torch.convert import model_to_reference
        from vmoe_torch.convert.native import write_reference_checkpoint  # noqa: F401
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        torch.manual_seed(0)
        model = create_model("ViT-B/16, E=8, K=2, Every 2", num_classes=21843)
        t = time.perf_counter()
        model_to_reference(model, prefix, num_shards=4)
        print(f"wrote the native checkpoint in {time.perf_counter() - t:.1f}s")
        if args.step == "write":
            return
    if args.step == "all":
        # Each measurement in its own parent so ru_maxrss (a high-water mark) is per child.
        for step in ("baseline", "convert", "load"):
            subprocess.run([sys.executable, __file__, "--dir", args.dir, "--step", step], check=True)
        return
    size = sum(os.path.getsize(os.path.join(args.dir, f)) for f in os.listdir(args.dir) if f.startswith("ckpt"))
    if args.step == "baseline":
        s, peak = _child([sys.executable, "-c", IMPORT_ONLY])
        print(f"checkpoint: {size / 2**30:.3f} GiB in 4 shards")
        print("| step | seconds | peak RSS (GiB) | peak / checkpoint | peak above import-only / checkpoint |")
        print("|---|---|---|---|---|")
        print(f"| import torch + vmoe_torch only | {s:.1f} | {peak / 2**30:.3f} | {peak / size:.2f} | - |")
        with open(os.path.join(args.dir, "baseline"), "w") as f:
            f.write(str(peak))
        return
    base = int(open(os.path.join(args.dir, "baseline")).read())
    if args.step == "convert":
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "vmoe_torch.cli.main", "convert", prefix, out,
               "--preset", "vmoe_b16_imagenet21k_randaug_strong"]
        name = "vmoe convert (native -> safetensors)"
    else:
        cmd = [sys.executable, "-c", LOAD, out]
        name = "from_pretrained (safetensors)"
    s, peak = _child(cmd)
    print(f"| {name} | {s:.1f} | {peak / 2**30:.3f} | {peak / size:.2f} | {(peak - base) / size:.2f} |",
          flush=True)


if __name__ == "__main__":
    main()
