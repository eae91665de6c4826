"""`vmoe calibrate`: a model's accuracy against compute over routing
settings, stored with the model for `model.at_budget(...)`."""
from __future__ import annotations

import argparse
import os
from typing import Any

from .train_cli import _CONFIG_HELP, _load


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure accuracy against compute over routing settings",
                       description="Sweeps the routing settings that change compute without retraining "
                                   "(K, capacity factor, BPR, dropless) on the config's test split, measures "
                                   "top-1, FLOPs per image and latency for each, and stores the Pareto frontier "
                                   "in MODEL/calibration.json (with a table in its model card), where "
                                   "from_pretrained finds it for model.at_budget(...).")
    p.add_argument("model", help="a from_pretrained directory (a run's final/, or vmoe consolidate's output)")
    p.add_argument("config", nargs="?", default=None, help=_CONFIG_HELP + " (its data section)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch for FLOPs and latency")
    p.add_argument("--capacity-factors", type=_numbers(float), default=None,
                   help="comma-separated (default 0.125,0.25,0.5,0.75,1,1.05,1.5,2)")
    p.add_argument("--num-selected-experts", type=_numbers(int), default=None,
                   help="comma-separated K values (default 1 .. the trained K)")
    p.add_argument("--no-dropless", action="store_true", help="leave out the dropless settings")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per setting (median)")
    p.set_defaults(func=run_calibrate)


def _numbers(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",")]
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from e
    return parse


def run_calibrate(args: argparse.Namespace) -> int:
    from ..data.pipeline import build_datasets, eval_batches
    from ..evaluate.calibration import CAPACITY_FACTORS, calibrate
    from ..models import VisionTransformerMoe
    from ..storage.calibration import card_lines
    from ..storage.pretrained import add_calibration
    if not os.path.exists(os.path.join(args.model, "model.safetensors")):
        raise FileNotFoundError(f"{args.model!r} is not a from_pretrained directory (model.safetensors + "
                                "config.json): calibrate a run's final/, or `vmoe consolidate WORKDIR OUT` first.")
    cfg = _load(args)
    model = VisionTransformerMoe.from_pretrained(args.model)
    _, test = build_datasets(cfg.data)
    cal = calibrate(model, lambda: eval_batches(test, cfg.data.eval_batch_size), batch_size=args.batch_size,
                    repeats=args.repeats, progress=print, capacity_factors=args.capacity_factors or CAPACITY_FACTORS,
                    num_selected_experts=args.num_selected_experts, dropless=not args.no_dropless)
    add_calibration(args.model, cal)
    print("\n".join(card_lines(cal)[2:]))
    print(f"wrote {os.path.join(args.model, 'calibration.json')}")
    return 0
