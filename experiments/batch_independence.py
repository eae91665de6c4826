"""Does an image's prediction depend on the other images of its batch?

Evaluates trained demo models on the test set at several evaluation batch
sizes under three routings, all in one run:

- as trained: groups of images as configured, at the trained capacity
  (what timm's validate.py runs on a model built from its timm name);
- per image: every image its own routing group, same capacity;
- batch independent: `model.batch_independent_routing()` (dropless for
  top-K routers, per-image groups otherwise) -- the default of
  `vmoe timm-validate`.

Prints top-1 per batch size and the fraction of test images whose predicted
class differs from the batch-1 prediction.

Usage: python experiments/batch_independence.py [--model runs/demo/moe] [--config configs/demo_moe.yaml]
"""
from __future__ import annotations

import argparse
import os

import torch

from vmoe_torch.config import load_config
from vmoe_torch.data.pipeline import build_datasets, eval_batches, to_model_range
from vmoe_torch.models.loading import load_model

HERE = os.path.dirname(os.path.abspath(__file__))


@torch.no_grad()
def predictions(model, test, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    preds, labels = [], []
    for images, y in eval_batches(test, batch):
        preds.append(model(to_model_range(images)).argmax(-1))
        labels.append(torch.as_tensor(y))
    return torch.cat(preds), torch.cat(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/moe", help="trained work dir or from_pretrained dir")
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "demo_moe.yaml"))
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, test = build_datasets(load_config(args.config, []).data)
    model = load_model(args.model).eval()
    cfg = model.config
    per_image = {"group_size": cfg.tokens_per_image * cfg.moe.ensemble_size}
    settings = {"as trained (groups of images)": {}, "per image, same capacity": per_image,
                "batch independent": model.batch_independent_routing()}
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{args.model}: {len(test)} test images, trained group_size {model.group_size}, "
          f"routing {cfg.moe.routing.router} K={cfg.moe.routing.num_selected_experts} "
          f"C={cfg.moe.routing.capacity_factor}; torch {torch.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print("| routing | " + " | ".join(f"top-1 at -b {b}" for b in batches) + " | predictions changed vs -b 1 |")
    print("|---|" + "---|" * len(batches) + "---|")
    for name, changes in settings.items():
        with model.routing(**changes):
            runs = {b: predictions(model, test, b) for b in batches}
        first, labels = runs[batches[0]]
        top1 = [float((p == labels).float().mean()) for p, _ in runs.values()]
        changed = max(float((p != first).float().mean()) for p, _ in runs.values())
        print(f"| {name} | " + " | ".join(f"{t:.4f}" for t in top1) + f" | {changed:.4f} |", flush=True)


if __name__ == "__main__":
    main()
