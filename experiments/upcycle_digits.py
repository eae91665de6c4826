"""Sparse upcycling at CPU scale, on the bundled digits (make upcycle-experiment).

1. Pre-train the dense ViT-Mi/8 of the demo (configs/demo_dense.yaml) for
   PRE steps.
2. Continue it for EXTRA more steps, two ways, with the same optimiser,
   schedule and data order (a fresh AdamW, warm-up then linear decay):
   a. dense: the same dense model (configs/demo_dense.yaml, finetune.init);
   b. upcycled: `vmoe_torch.upcycle` of the same checkpoint into
      "ViT-Mi/8, E=8, K=2, Every 1" with the demo V-MoE's routing
      (configs/upcycle_digits.yaml).
   c. dense again, for as many extra steps as fit in the upcycled arm's wall
      clock (equal time rather than equal steps).
3. Print test accuracy and wall clock of every phase as a Markdown table and
   write OUT/results.json.

Usage: python experiments/upcycle_digits.py [--out runs/upcycle] [--pre 450] [--extra 450]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from vmoe_torch import save_pretrained
from vmoe_torch.config import load_config
from vmoe_torch.train.trainer import Trainer
from vmoe_torch.upcycling import upcycle
from vmoe_torch.utils.provenance import file_record

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "configs")


def _run(config: str, workdir: str, overrides: list[str]) -> tuple[dict, float]:
    cfg = load_config(os.path.join(CONFIGS, config), overrides + ["train.progress=false"])
    start = time.perf_counter()
    summary = Trainer(cfg, workdir).fit()
    return summary["eval"], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/upcycle")
    ap.add_argument("--pre", type=int, default=450)
    ap.add_argument("--extra", type=int, default=450)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    seed = [f"train.seed={args.seed}"]
    pre_eval, pre_s = _run("demo_dense.yaml", os.path.join(args.out, "dense_pre"),
                           seed + [f"train.steps={args.pre}"])
    init = os.path.join(args.out, "dense_pre", "final")
    cont = seed + [f"train.steps={args.extra}", f"finetune.init={init}", "finetune.new_head=false",
                   "optim.lr=0.001"]
    # finetune.init takes the architecture from the checkpoint: no model changes.
    dense_eval, dense_s = _run("demo_dense.yaml", os.path.join(args.out, "dense"),
                               cont + ["model={}"])
    start = time.perf_counter()
    model = upcycle(init, "ViT-Mi/8, E=8, K=2, Every 1", source_format="vmoe_torch", group_size=800,
                    bfloat16_dispatch=False, importance_loss_weight=0.005, load_loss_weight=0.005)
    up_dir = os.path.join(args.out, "upcycled_init")
    save_pretrained(model, up_dir, source={"kind": "upcycled", "from": "vmoe_torch", **file_record(init)})
    upcycle_s = time.perf_counter() - start
    up_eval, up_s = _run("upcycle_digits.yaml", os.path.join(args.out, "upcycled"),
                         seed + [f"train.steps={args.extra}", f"finetune.init={up_dir}"])
    same_time = max(args.extra, round(args.extra * up_s / dense_s))
    long_cont = [c for c in cont if not c.startswith("train.steps=")] + [f"train.steps={same_time}"]
    long_eval, long_s = _run("demo_dense.yaml", os.path.join(args.out, "dense_equal_time"),
                             long_cont + ["model={}"])
    rows = [("dense, pre-trained", args.pre, pre_eval, pre_s),
            (f"dense, + {args.extra} steps", args.pre + args.extra, dense_eval, dense_s),
            (f"upcycled V-MoE (E=8, K=2, every block), + {args.extra} steps", args.pre + args.extra,
             up_eval, up_s),
            (f"dense, + {same_time} steps (the upcycled arm's wall clock)", args.pre + same_time,
             long_eval, long_s)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; upcycling itself took {upcycle_s:.1f} s")
    print("| model | total steps | test top-1 | test top-5 | wall clock of this phase (s) |")
    print("|---|---|---|---|---|")
    for name, steps, ev, secs in rows:
        print(f"| {name} | {steps} | {ev['top1']:.4f} | {ev['top5']:.4f} | {secs:.0f} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"pre_steps": args.pre, "extra_steps": args.extra, "seed": args.seed,
                   "upcycle_seconds": upcycle_s,
                   "rows": [{"model": n, "steps": s, "eval": e, "seconds": t} for n, s, e, t in rows]},
                  f, indent=2)


if __name__ == "__main__":
    main()
