"""`vmoe attack`: PGD attacks and routing changes under attack."""
from __future__ import annotations

import argparse
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="PGD adversarial attack: accuracy and per-layer routing change",
                       description="Runs the reference's PGD attack (projects/adversarial_attacks) on the test "
                                   "split at each --eps and reports clean / adversarial top-1 and loss, the "
                                   "prediction changes and, per MoE layer, the routing change (1 - IoU of the "
                                   "experts selected before and after). Writes OUT/attack.json and "
                                   "OUT/attack.png; `vmoe analyze --out OUT` adds them to report.html.")
    p.add_argument("checkpoint", help="a training work dir or a from_pretrained dir (MoE or dense)")
    p.add_argument("--data", required=True, help="a YAML experiment config or a data.name such as 'digits'")
    eps = p.add_mutually_exclusive_group()
    eps.add_argument("--eps", type=float, nargs="+", default=None,
                     help="max change per pixel in the model's [-1, 1] input range (1/127.5 = one grey level)")
    eps.add_argument("--levels", type=float, nargs="+", default=None,
                     help="the same in grey levels of 255 (eps = level / 127.5; default: 1 2 4)")
    p.add_argument("--steps", type=int, default=10, help="PGD updates of eps/steps each (the reference: 40)")
    p.add_argument("--images", type=int, default=512, help="test images to attack (the first N)")
    p.add_argument("--attack-auxiliary-loss", action="store_true", help="attack CE + the auxiliary loss")
    p.add_argument("--label", default=None, help="the model's name in attack.json (default: the checkpoint)")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..analysis.attack import attack_sweep, write_attack
    from ..data.pipeline import eval_batches, to_model_range
    from ..models.loading import load_model
    from .data_arg import test_split
    if args.eps is None:
        args.eps = [level / 127.5 for level in (args.levels or [1.0, 2.0, 4.0])]
    if args.steps < 1 or args.images < 1 or any(not e >= 0 for e in args.eps):
        raise ValueError("--steps and --images must be >= 1 and every --eps >= 0.")
    model = load_model(args.checkpoint).eval()
    cfg, test = test_split(args.data, args.overrides, model)
    subset = torch.utils.data.Subset(test, range(min(args.images, len(test))))

    def batches():
        return ((to_model_range(x), y) for x, y in eval_batches(subset, cfg.data.eval_batch_size))
    rows = attack_sweep(model, batches, args.eps, args.steps, args.attack_auxiliary_loss)
    path = write_attack(rows, args.out, args.label or os.path.basename(os.path.normpath(args.checkpoint)))
    print("| eps (grey levels) | clean top-1 | attacked top-1 | predictions changed | routing change per layer |")
    print("|---|---|---|---|---|")
    for r in rows:
        layers = ", ".join(f"{n} {v:.3f}" for n, v in r["routing_changes"].items()) or "-"
        print(f"| {r['eps'] * 127.5:g} | {r['clean_top1']:.4f} | {r['adversarial_top1']:.4f} | "
              f"{r['prediction_changes']:.4f} | {layers} |")
    print(f"wrote {path} and attack.png")
    return 0
