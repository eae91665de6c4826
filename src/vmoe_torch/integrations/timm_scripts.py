"""`vmoe timm-train` / `vmoe timm-validate`: training and validation built
from timm's own components, for any model in timm's registry (ours included).

The pieces are timm's: `create_dataset` (ImageFolder), `resolve_data_config`
and `create_loader` (the model's input size, interpolation, crop and
mean/std), `create_optimizer_v2` (weight decay off for `no_weight_decay()`,
layer-wise decay through `group_matcher()`), `create_scheduler_v2`, the
classification loss factory, `timm.utils.accuracy` and `update_summary`.
What we add is the task (`MoeClassificationTask`: the auxiliary loss
included), E^3 evaluation (members' probabilities averaged), and writing the
result with `save_pretrained` (safetensors, atomic).

timm's own train.py / validate.py scripts live in timm's source repository,
not in its package; with a checkout, `import vmoe_torch` before they create
the model registers our names (see docs/usage.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from typing import Any, Optional

import torch

from ..convert.timm_checkpoint import read_timm_checkpoint
from ..models.vit_moe import VisionTransformerMoe
from ..storage.calibration import parse_request
from ..utils.io import atomic_write_text
from ..utils.state import state_mismatch
from .timm_pretrained import GENERIC


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("timm-train", help="train any timm-registered model with timm's components "
                                          "(MoE auxiliary loss included)")
    t.add_argument("data_dir", help="ImageFolder root with train/ and validation/ splits")
    t.add_argument("--model", required=True, help="timm model name (e.g. vmoe_mi4_every2_e8_k2)")
    t.add_argument("--output", required=True, help="directory for summary.csv and the trained model")
    t.add_argument("--num-classes", type=int, default=None)
    t.add_argument("--img-size", type=int, default=None)
    t.add_argument("--pretrained-file", default=None, help="converted / save_pretrained directory to start from")
    t.add_argument("-b", "--batch-size", type=int, default=32)
    t.add_argument("--epochs", type=int, default=1)
    t.add_argument("--max-steps", type=int, default=None, help="stop each epoch after this many steps")
    t.add_argument("--opt", default="adamw")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.05)
    t.add_argument("--layer-decay", type=float, default=None)
    t.add_argument("--sched", default="cosine")
    t.add_argument("--warmup-epochs", type=int, default=0)
    t.add_argument("--smoothing", type=float, default=0.0)
    t.add_argument("--drop-path", type=float, default=None)
    t.add_argument("--no-aug", action="store_true", help="no training augmentation")
    t.add_argument("--grad-checkpointing", action="store_true")
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true", help="replace an existing output/model")
    t.set_defaults(func=train)
    v = sub.add_parser("timm-validate", help="top-1/top-5 of a saved model on an ImageFolder split with "
                                             "timm's data pipeline")
    v.add_argument("data_dir")
    v.add_argument("--checkpoint", required=True,
                   help="save_pretrained / converted directory, or a timm train.py checkpoint (.pth.tar)")
    v.add_argument("--model", default=None, help="timm model name for a .pth.tar (default: the name it records)")
    v.add_argument("--use-ema", action="store_true", help="a .pth.tar's EMA weights (state_dict_ema)")
    v.add_argument("--pretrained-path", default=None,
                   help="for a .pth.tar trained as vmoe_pretrained: the save_pretrained directory that "
                        "gives its architecture (default: the --pretrained-path it records)")
    v.add_argument("--routing", choices=("batch-independent", "as-trained"), default="batch-independent",
                   help="batch-independent (default): each image's prediction does not depend on the "
                        "other images of its batch (dropless top-K, per-image groups otherwise); "
                        "as-trained: the model's own groups and capacity (results vary with -b)")
    v.add_argument("--budget", default=None, metavar="REQUEST",
                   help="run at a compute budget chosen from the model's calibration (vmoe calibrate): "
                        "relative=0.5, flops=2e7 or accuracy_drop=0.01 (replaces --routing)")
    v.add_argument("--split", default="validation")
    v.add_argument("-b", "--batch-size", type=int, default=64)
    v.add_argument("--workers", type=int, default=0)
    v.add_argument("--results-file", default=None, help="also write the results as JSON here")
    v.set_defaults(func=validate)


def _require_timm() -> Any:
    try:
        import timm
        import timm.data
        import timm.loss
        import timm.models
        import timm.optim
        import timm.scheduler
        import timm.utils
    except ImportError as err:
        raise ValueError("timm-train / timm-validate need timm: pip install 'vmoe-torch[timm]'.") from err
    return timm


def _split_dir(data_dir: str, split: str) -> str:
    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} not found: the ImageFolder root needs a {split}/ directory "
                                "with one sub-directory per class (`vmoe export-digits DIR` writes one).")
    return path


def _loader(timm: Any, model: torch.nn.Module, root: str, batch_size: int, training: bool,
            workers: int, no_aug: bool = False) -> Any:
    dataset = timm.data.create_dataset("", root=root, is_training=training)
    data = timm.data.resolve_data_config(model=model)
    return timm.data.create_loader(
        dataset, input_size=data["input_size"], batch_size=batch_size, is_training=training, no_aug=no_aug,
        interpolation=data["interpolation"], mean=data["mean"], std=data["std"], crop_pct=data["crop_pct"],
        num_workers=workers, use_prefetcher=False, persistent_workers=False)


def train(args: argparse.Namespace) -> int:
    timm = _require_timm()
    from .timm_task import MoeClassificationTask
    train_dir = _split_dir(args.data_dir, "train")
    final = os.path.join(args.output, "model")
    if os.path.exists(final) and not args.overwrite:
        raise FileExistsError(f"{final!r} exists; pass --overwrite to replace it.")
    timm.utils.random_seed(args.seed)
    kwargs: dict[str, Any] = {}
    for key, value in (("num_classes", args.num_classes), ("img_size", args.img_size),
                       ("drop_path_rate", args.drop_path)):
        if value is not None:
            kwargs[key] = value
    if args.pretrained_file:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": args.pretrained_file})
    model = timm.create_model(args.model, **kwargs)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    loader = _loader(timm, model, train_dir, args.batch_size, True, args.workers, args.no_aug)
    optimizer = timm.optim.create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                               layer_decay=args.layer_decay)
    scheduler, epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.lr * 0.01)
    criterion = timm.loss.LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing \
        else torch.nn.CrossEntropyLoss()
    task = MoeClassificationTask(model, criterion=criterion, verbose=False)
    os.makedirs(args.output, exist_ok=True)
    summary = os.path.join(args.output, "summary.csv")
    for epoch in range(epochs):
        model.train()
        sums = {key: torch.zeros(()) for key in ("loss", "task_loss", "aux_loss")}  # summed on the device
        steps, start = 0, time.time()
        for images, targets in loader:
            out = task(images, targets)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            for key in sums:
                sums[key] = sums[key].to(out[key].device) + out[key].detach()
            steps += 1
            if args.max_steps and steps >= args.max_steps:
                break
        scheduler.step(epoch + 1)
        metrics: dict[str, float] = {k: float(v) / max(steps, 1) for k, v in sums.items()}
        metrics.update(steps=steps, seconds=round(time.time() - start, 2), lr=optimizer.param_groups[0]["lr"])
        timm.utils.update_summary(epoch, metrics, {}, summary, write_header=epoch == 0)
        print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    if isinstance(model, VisionTransformerMoe):
        model.save_pretrained(final, overwrite=args.overwrite)
    else:
        timm.models.save_for_hf(model, final)
    print(f"saved {final}")
    return 0


def evaluate_loader(model: torch.nn.Module, loader: Any) -> dict[str, float]:
    """Top-1 / top-5 (%) and the mean loss of `model` over `loader`; an E^3
    model is scored on its members' averaged probabilities (its output)."""
    from timm.utils import accuracy

    model.eval()
    totals = {"top1": 0.0, "top5": 0.0, "loss": 0.0}
    count = 0
    with torch.no_grad():
        for images, targets in loader:
            log_probs = torch.log_softmax(model(images).float(), dim=-1)  # E^3: already the members' mean
            k = min(5, log_probs.shape[-1])
            top1, top5 = accuracy(log_probs, targets, topk=(1, k))
            n = targets.shape[0]
            totals["top1"] += float(top1) * n
            totals["top5"] += float(top5) * n
            totals["loss"] += float(torch.nn.functional.nll_loss(log_probs, targets)) * n
            count += n
    if not count:
        raise ValueError("The split has no images.")
    return {key: value / count for key, value in totals.items()} | {"images": count}


def _validation_model(timm: Any, args: argparse.Namespace) -> torch.nn.Module:
    """The model of `--checkpoint`: a save_pretrained directory, or a timm
    training checkpoint built as its timm name with the classes and image
    size it was trained at (weights only; every tensor must match)."""
    if os.path.isdir(args.checkpoint):
        return VisionTransformerMoe.from_pretrained(args.checkpoint)
    ckpt = read_timm_checkpoint(args.checkpoint, args.use_ema)
    if args.model and ckpt.arch and args.model != ckpt.arch:
        raise ValueError(f"{os.path.basename(args.checkpoint)} was trained as {ckpt.arch}, not {args.model}: "
                         "drop --model (the checkpoint's own name is used), or pass the right one.")
    name = args.model or ckpt.arch
    if not name:
        raise ValueError(f"{os.path.basename(args.checkpoint)} does not record its model name (arch): "
                         "pass --model NAME, the timm name it was trained as.")
    kwargs: dict[str, Any] = {}
    if name == GENERIC:  # the architecture is the save_pretrained directory train.py started from
        source = getattr(args, "pretrained_path", None) or ckpt.args.get("pretrained_path")
        if not source or not os.path.exists(source):
            raise ValueError(f"{os.path.basename(args.checkpoint)} was trained as {GENERIC}, whose architecture "
                             f"is its --pretrained-path directory ({source!r}): pass --pretrained-path DIR.")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": source})
    if "head.weight" in ckpt.state_dict:
        kwargs["num_classes"] = int(ckpt.state_dict["head.weight"].shape[0])
    size = ckpt.args.get("img_size") or (ckpt.args.get("input_size") or [None])[-1]
    if size:
        kwargs["img_size"] = int(size)
    model = timm.create_model(name, **kwargs)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mismatch = state_mismatch(expected, {k: tuple(v.shape) for k, v in ckpt.state_dict.items()},
                              os.path.basename(args.checkpoint))
    if mismatch:
        raise ValueError(f"{os.path.basename(args.checkpoint)} does not fit {name} {kwargs}:{mismatch}\n"
                         "Pass the --model it was trained as.")
    model.load_state_dict(ckpt.state_dict, strict=True)
    return model.eval()


def validate(args: argparse.Namespace, results: Optional[dict[str, Any]] = None) -> int:
    timm = _require_timm()
    root = _split_dir(args.data_dir, args.split)
    model = _validation_model(timm, args)
    loader = _loader(timm, model, root, args.batch_size, False, args.workers)
    budget = getattr(args, "budget", None)
    if budget:  # the calibrated setting for the request, as vmoe eval --budget
        if not isinstance(model, VisionTransformerMoe):
            raise ValueError("--budget needs a vmoe-torch model with a calibration (vmoe calibrate).")
        chosen = model.at_budget(**parse_request(budget))
        out: dict[str, Any] = dict(evaluate_loader(model, loader))
        out.update(routing=f"budget {budget}: {chosen.point.describe()}", flops_per_image=chosen.flops_per_image)
    else:
        changes = model.batch_independent_routing() \
            if args.routing == "batch-independent" and isinstance(model, VisionTransformerMoe) else {}
        with model.routing(**changes) if changes else contextlib.nullcontext():  # type: ignore[operator]
            out = dict(evaluate_loader(model, loader))
        out["routing"] = args.routing
    input_size = list(getattr(model, "pretrained_cfg", {}).get("input_size", ()))
    out.update(checkpoint=args.checkpoint, split=args.split, input_size=input_size,
               param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 3))
    text = json.dumps(out, indent=2)
    print(text)
    if args.results_file:
        atomic_write_text(args.results_file, text + "\n")
    if results is not None:
        results.update(out)
    return 0
