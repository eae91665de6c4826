"""`make demo`: the end-to-end run on the bundled cluttered digits.

Trains the demo V-MoE and its dense twin (configs/demo_moe.yaml,
configs/demo_dense.yaml), evaluates both, sweeps the V-MoE's routing
(capacity x K x vanilla/BPR), few-shot evaluates both, runs the routing
analysis, and writes WORKDIR/results.json and a printed table.

WORKDIR layout:
  moe/, dense/      training work dirs (checkpoints/, metrics.jsonl, tb/, final/)
  analysis/         the routing-analysis report (analysis.json, report.md, CSVs, PNGs)
  results.json      the numbers below
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .analysis.report import CAPACITY_FACTORS, analyze
from .config import load_config
from .data.pipeline import eval_batches
from .evaluate.calibration import count_flops
from .evaluate.fewshot import extract_features, fewshot_evaluate
from .train.trainer import Trainer
from .utils.io import atomic_write_json

_QUICK = ["train.steps=12", "train.log_every=4", "train.checkpoint_every=6", "data.train_renders=1",
          "data.test_renders=1", "fewshot.seeds=1", "fewshot.shots=[1,5]"]


def config_dir() -> Path:
    here = Path(__file__).resolve().parents[2] / "configs"
    if not (here / "demo_moe.yaml").exists():
        raise FileNotFoundError("configs/demo_moe.yaml not found: run the demo from a source checkout.")
    return here


def flops_per_image(model, image: torch.Tensor, group_images: int) -> float:
    """Forward FLOPs per image (`evaluate.calibration.count_flops`), on a
    batch of `group_images` images so MoE layers see a full routing group.
    Expert matmuls count every buffer slot (C per expert), filled or not."""
    return count_flops(model, image.expand(group_images, -1, -1, -1))


def run_demo(workdir: str = "runs/demo", quick: bool = False, overrides: Sequence[str] = ()) -> dict[str, Any]:
    t0 = time.perf_counter()
    cdir = config_dir()
    extra = (_QUICK if quick else []) + list(overrides)
    results: dict[str, Any] = {"workdir": workdir}
    trainers = {}
    for name in ("moe", "dense"):
        cfg = load_config(str(cdir / f"demo_{name}.yaml"), extra)
        start = time.perf_counter()
        trainer = Trainer(cfg, os.path.join(workdir, name))
        summary = trainer.fit()
        wall = time.perf_counter() - start
        trainers[name] = trainer
        model = trainer.model
        tpi = model.config.tokens_per_image
        moe_cfg = model.config.moe
        group_images = max(1, moe_cfg.group_size // tpi) if moe_cfg is not None and moe_cfg.group_size else 8
        image = trainer.test_ds[0][0][None].float() / 127.5 - 1
        results[name] = {
            "model": cfg.model.name, "steps": cfg.train.steps, "batch_size": cfg.data.batch_size,
            "train_wall_clock_s": wall, "status": summary["status"],
            "test_accuracy": summary["eval"]["top1"], "test_top5": summary["eval"]["top5"],
            "eval_capacity_factor": cfg.eval.capacity_factor if model.moe_layers() else None,
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_image": flops_per_image(model, image, group_images),
        }
        print(f"[demo] {name}: test accuracy {results[name]['test_accuracy']:.4f} after "
              f"{wall:.0f}s of training", flush=True)
    moe = trainers["moe"]
    results["eval_batch_size"] = moe.cfg.data.eval_batch_size
    results["image_size"] = moe.cfg.data.image_size
    results["num_test_images"] = len(moe.test_ds)

    analysis_dir = os.path.join(workdir, "analysis")
    analysis = analyze(moe.model, moe.test_ds, analysis_dir, moe.cfg.data.eval_batch_size,
                       CAPACITY_FACTORS if not quick else (0.25, 0.5, 1.0, 2.0))
    results["capacity_sweep"] = [
        {k: r[k] for k in ("capacity_factor", "num_selected_experts", "batch_priority", "test_accuracy",
                           "processed_fraction")} for r in analysis["capacity_sweep"]]
    results["moe"]["ablated_test_accuracy"] = analysis["ablation"]["MoE outputs zeroed"]
    results["specialisation"] = analysis["specialisation"]

    fs_cfg = moe.cfg.fewshot
    results["fewshot"] = {}
    for name, trainer in trainers.items():
        train_ds = trainer.train_ds
        saved_tf, train_ds.transform = train_ds.transform, None
        trx, try_ = extract_features(trainer.model, eval_batches(train_ds, trainer.cfg.data.eval_batch_size))
        train_ds.transform = saved_tf
        tex, tey = extract_features(trainer.model, eval_batches(trainer.test_ds, trainer.cfg.data.eval_batch_size))
        results["fewshot"][name] = fewshot_evaluate(trx, try_, tex, tey, fs_cfg.shots, fs_cfg.seeds,
                                                    fs_cfg.l2_grid)
    results["total_wall_clock_s"] = time.perf_counter() - t0
    atomic_write_json(os.path.join(workdir, "results.json"), results)
    print(format_results(results))
    return results


def format_results(r: dict[str, Any]) -> str:
    lines = ["", "| model | test acc | train time (s) | params | GFLOPs/image (fwd) |", "|---|---|---|---|---|"]
    for name in ("moe", "dense"):
        m = r[name]
        lines.append(f"| {name} ({m['model']}) | {m['test_accuracy']:.4f} | {m['train_wall_clock_s']:.0f} | "
                     f"{m['params']:,} | {m['flops_per_image'] / 1e9:.4f} |")
    lines += ["", f"V-MoE with every MoE output zeroed: {r['moe']['ablated_test_accuracy']:.4f}", "",
              "| K | C | vanilla | BPR |", "|---|---|---|---|"]
    sweep = r["capacity_sweep"]
    for k in sorted({s["num_selected_experts"] for s in sweep}, reverse=True):
        for cf in sorted({s["capacity_factor"] for s in sweep}):
            acc = {s["batch_priority"]: s["test_accuracy"] for s in sweep
                   if s["num_selected_experts"] == k and s["capacity_factor"] == cf}
            lines.append(f"| {k} | {cf} | {acc.get(False, float('nan')):.4f} | {acc.get(True, float('nan')):.4f} |")
    lines += ["", "| shots | V-MoE few-shot | dense few-shot |", "|---|---|---|"]
    for shots in r["fewshot"]["moe"]:
        a, b = r["fewshot"]["moe"][shots], r["fewshot"]["dense"][shots]
        lines.append(f"| {shots} | {a['mean']:.4f} ± {a['std']:.4f} | {b['mean']:.4f} ± {b['std']:.4f} |")
    lines.append(f"\ntotal wall clock {r['total_wall_clock_s']:.0f}s; results in {r['workdir']}/results.json")
    return "\n".join(lines)
