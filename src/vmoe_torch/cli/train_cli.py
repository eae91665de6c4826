"""`vmoe train | finetune | eval | fewshot | demo | analyze`."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..utils.io import atomic_write_json

_CONFIG_HELP = "YAML experiment config (see configs/); omit for the defaults"
_SET_HELP = "dotted override, repeatable: --set optim.lr=1e-3 --set model.moe.num_experts=4"


def _common(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    if config_required:
        p.add_argument("config", help=_CONFIG_HELP)
    else:
        p.add_argument("config", nargs="?", default=None, help=_CONFIG_HELP)
    p.add_argument("--workdir", required=True, help="run directory (checkpoints, metrics.jsonl, tb/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=_SET_HELP)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model from a config (resumes automatically)",
                       description="Trains the config's model on its data. If --workdir already holds "
                                   "a checkpoint of the same config, training resumes from it. "
                                   "SIGTERM/SIGINT write a checkpoint and exit with 128 + the signal (143 / 130).")
    _common(p)
    p.add_argument("--force", action="store_true",
                   help="start over in a work dir that holds a checkpoint of a different config")
    p.add_argument("--expert-parallel", action="store_true",
                   help="under torchrun: shard every MoE layer's experts over the ranks "
                        "(train.expert_parallel=true); without it, torchrun runs data parallel")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: FSDP2-shard the non-expert parameters over all ranks "
                        "(train.fsdp=true); with --expert-parallel the experts are sharded too "
                        "(train.expert_shards ranks per expert group, default all)")
    p.set_defaults(func=run_train)

    p = sub.add_parser("finetune", help="fine-tune from a checkpoint (new head, new resolution, freezing)",
                       description="Like train, with finetune.init set to INIT: a training work dir "
                                   "or a from_pretrained directory (e.g. a converted release).")
    _common(p)
    p.add_argument("--init", required=True, help="work dir or from_pretrained dir to start from")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=run_finetune)

    _add_eval_parser(sub)


    p = sub.add_parser("fewshot", help="few-shot linear evaluation on frozen features")
    p.add_argument("checkpoint")
    p.add_argument("config", nargs="?", default=None, help=_CONFIG_HELP)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.set_defaults(func=run_fewshot)

    p = sub.add_parser("analyze", help="routing analysis report (BPR vs vanilla, specialisation, token maps)",
                       description="Writes OUT/report.md, analysis.json, CSVs and PNG figures for CHECKPOINT "
                                   "(a training work dir or a from_pretrained dir).")
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True,
                   help="a YAML experiment config (its data section is used) or a data.name such as 'digits'")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override, e.g. --set data.path=/data/cifar10")
    p.add_argument("--images", type=int, default=4, help="images in the token-map figure")
    p.add_argument("--soft-moe", default=None, metavar="DIR",
                   help="a Soft MoE model (work dir or from_pretrained dir) to add to the capacity "
                        "sweep at matched compute")
    p.set_defaults(func=run_analyze)

    p = sub.add_parser("consolidate", aliases=["export-checkpoint"],
                       help="a training checkpoint (either layout) as one from_pretrained directory",
                       description="Writes the model of WORKDIR's newest readable checkpoint (or of one "
                                   "checkpoint directory) as OUT_DIR (model.safetensors, config.json, "
                                   "README.md). Sharded checkpoints are streamed one tensor at a time.")
    p.add_argument("checkpoint", help="a training work dir or one of its checkpoints/step_* directories")
    p.add_argument("out", help="the from_pretrained directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=run_consolidate)

    p = sub.add_parser("demo", help="the bundled end-to-end demo (make demo)",
                       description="Trains a tiny V-MoE and the dense ViT of the same backbone on the "
                                   "bundled cluttered digits, evaluates both (and the V-MoE over a "
                                   "routing grid), few-shot evaluates both, writes results.json "
                                   "and the routing-analysis report with its figures.")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a much shorter run, for a smoke test")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to both models' configs")
    p.set_defaults(func=run_demo)


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model, optionally over a routing grid",
                       description="Top-1/top-5 accuracy of CHECKPOINT (work dir or from_pretrained dir) "
                                   "on the config's test data, at eval.capacity_factor, and with --grid "
                                   "at every (capacity factor, K, vanilla/BPR) setting of the eval section.")
    p.add_argument("checkpoint")
    p.add_argument("config", nargs="?", default=None,
                   help=_CONFIG_HELP + " (default: the work dir's own config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--grid", action="store_true", help="also sweep the routing grid")
    p.add_argument("--budget", default=None, metavar="REQUEST",
                   help="evaluate at a compute budget chosen from the model's calibration (vmoe calibrate): "
                        "relative=0.5, flops=2e7 or accuracy_drop=0.01")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.set_defaults(func=run_eval)


def _load(args: argparse.Namespace, extra: Sequence[str] = ()):
    from ..config import load_config
    if args.config is not None and not os.path.exists(args.config):
        raise FileNotFoundError(f"Config file {args.config!r} not found.")
    if args.config is None and os.environ.get("RANK", "0") == "0":
        print(f"vmoe {args.command}: no config file: every setting not given with --set is a default of "
              "vmoe_torch.config.experiment (configs/ holds complete ones).", file=sys.stderr)
    return load_config(args.config, list(extra) + list(args.overrides))


def run_train(args: argparse.Namespace) -> int:
    extra = ["train.expert_parallel=true"] if args.expert_parallel else []
    if args.fsdp:
        extra.append("train.fsdp=true")
    return _fit(_load(args, extra), args)


def run_finetune(args: argparse.Namespace) -> int:
    return _fit(_load(args, [f"finetune.init={args.init}"]), args)


def _fit(cfg, args: argparse.Namespace) -> int:
    """Trains; under torchrun the process group is torn down on every path,
    after a barrier when every rank got here (success, or an error they all
    raised: `ParallelMode.agree`); rank 0 prints the summary."""
    from ..distributed.runtime import shutdown
    from ..train.trainer import Trainer
    from ..utils.errors import is_agreed
    from .errors import EXPECTED, report
    together = False  # every rank is here: they meet before tearing the group down
    try:
        trainer = Trainer(cfg, args.workdir, force=args.force)
        summary = trainer.fit()
        together = True
    except BaseException as e:
        together = is_agreed(e)  # raised by every rank at the same point
        if together and isinstance(e, EXPECTED) and not getattr(args, "debug", False):
            report(args.command, e)  # before the teardown, after which a peer may exit first
        raise
    finally:
        shutdown(synchronize=together)
    if trainer.rank == 0:
        print(json.dumps(summary, indent=2))
    return exit_code(summary)


def exit_code(summary: dict) -> int:
    """0 when training finished; 128 + signal (143 for SIGTERM, 130 for
    SIGINT) when a signal stopped it after its checkpoint, so schedulers see
    that the job did not finish (rerun the same command to resume)."""
    return 128 + int(summary["signal"]) if "signal" in summary else 0


def run_eval(args: argparse.Namespace) -> int:
    from ..data.pipeline import build_datasets, eval_batches
    from ..evaluate.classification import evaluate_at_capacity, format_grid, routing_grid
    from ..models.loading import load_model
    own = os.path.join(args.checkpoint, "config.yaml")
    if args.config is None and os.path.exists(own):  # a training work dir: evaluate on its own data
        args.config = own
    cfg = _load(args)
    model = load_model(args.checkpoint)
    _, test = build_datasets(cfg.data)

    def loader():
        return eval_batches(test, cfg.data.eval_batch_size)
    result: dict = {"eval_batch_size": cfg.data.eval_batch_size}
    if args.budget:
        from ..evaluate.classification import evaluate_classification
        from ..storage.calibration import parse_request
        chosen = model.at_budget(**parse_request(args.budget))
        result["budget"] = {"request": args.budget, "routing": chosen.routing,
                            "flops_per_image": chosen.flops_per_image}
        print(f"budget {args.budget}: {chosen.point.describe()} "
              f"({chosen.flops_per_image / 1e6:.2f} MFLOPs / image)")
        result["test"] = evaluate_classification(model, loader())
    else:
        result["test"] = evaluate_at_capacity(model, loader(), cfg.eval.capacity_factor)
    print(f"top-1 {result['test']['top1']:.4f}  top-5 {result['test']['top5']:.4f}")
    if args.grid:
        rows = routing_grid(model, loader, cfg.eval.grid_capacity_factors,
                            cfg.eval.grid_num_selected_experts or None, cfg.eval.grid_batch_priority)
        result["capacity_sweep"] = rows
        print(format_grid(rows))
    if args.out:
        atomic_write_json(args.out, result)
    return 0


def run_fewshot(args: argparse.Namespace) -> int:
    from ..data.pipeline import build_datasets, eval_batches
    from ..evaluate.fewshot import extract_features, fewshot_evaluate
    from ..models.loading import load_model
    cfg = _load(args)
    model = load_model(args.checkpoint)
    train, test = build_datasets(cfg.data)
    train.transform = None  # frozen features of the un-augmented images
    trx, try_ = extract_features(model, eval_batches(train, cfg.data.eval_batch_size))
    tex, tey = extract_features(model, eval_batches(test, cfg.data.eval_batch_size))
    res = fewshot_evaluate(trx, try_, tex, tey, cfg.fewshot.shots, cfg.fewshot.seeds, cfg.fewshot.l2_grid)
    for shots, r in res.items():
        print(f"{shots:>3}-shot: {r['mean']:.4f} ± {r['std']:.4f}")
    if args.out:
        atomic_write_json(args.out, res)
    return 0


def run_consolidate(args: argparse.Namespace) -> int:
    from ..models.loading import consolidate
    if args.command == "export-checkpoint":
        print("vmoe export-checkpoint is now `vmoe consolidate`; the old name will be removed.", file=sys.stderr)
    used = consolidate(args.checkpoint, args.out, args.overwrite)
    print(f"wrote {args.out} from {used}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    from ..analysis.report import analyze
    from ..models.loading import load_model
    from .data_arg import test_split
    model = load_model(args.checkpoint)
    cfg, test = test_split(args.data, args.overrides, model)
    soft = load_model(args.soft_moe) if args.soft_moe else None
    res = analyze(model, test, args.out, cfg.data.eval_batch_size, num_map_images=args.images,
                  soft_model=soft)
    print(f"report: {os.path.join(args.out, 'report.md')} (one page: {os.path.join(args.out, 'report.html')})")
    for s in res["specialisation"]:
        print(f"  {s['name']}: class/expert NMI {s['value']:.3f}")
    if "soft_moe" in res:
        soft_row = res["soft_moe"]
        print(f"  Soft MoE: accuracy {soft_row['test_accuracy']:.4f} at matched C_eq "
              f"{soft_row['equivalent_capacity_factor']:.3f}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo as demo
    demo(args.workdir, quick=args.quick, overrides=args.overrides)
    return 0
