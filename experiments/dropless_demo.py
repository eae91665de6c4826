"""The demo V-MoE (trained at C = 1.05) evaluated with the dropless backend
against fixed capacities, no retraining.

Prints test top-1, the mean dropped fraction over the MoE layers and the
wall clock of one pass over the test set, for C = 1.05 (as trained), C = 2,
C = 4 (the reference's evaluation setting) and dropless, all in one run.

Usage: python experiments/dropless_demo.py [--model runs/demo/moe] [--config configs/demo_moe.yaml]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from vmoe_torch.config import load_config
from vmoe_torch.data.pipeline import build_datasets, eval_batches
from vmoe_torch.evaluate.classification import evaluate_classification
from vmoe_torch.models.loading import load_model

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/moe", help="trained work dir or from_pretrained dir")
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "demo_moe.yaml"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, [])
    _, test = build_datasets(cfg.data)
    model = load_model(args.model).eval()
    settings = {"C=1.05 (trained)": {"capacity_factor": 1.05}, "C=2": {"capacity_factor": 2.0},
                "C=4": {"capacity_factor": 4.0}, "dropless": {"dropless": True}}
    print(f"{len(test)} test images, batch {cfg.data.eval_batch_size}, torch {torch.__version__}, "
          f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| routing | top-1 | dropped fraction | eval wall clock (s) |")
    print("|---|---|---|---|")
    for name, changes in settings.items():
        with model.routing(**changes):
            start = time.perf_counter()
            out = evaluate_classification(model, eval_batches(test, cfg.data.eval_batch_size))
            seconds = time.perf_counter() - start
        dropped = [v for k, v in out.items() if k.endswith("dropped_fraction")]
        print(f"| {name} | {out['top1']:.4f} | {sum(dropped) / len(dropped):.4f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
