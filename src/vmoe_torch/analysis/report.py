"""`analyze(model, test_ds, out_dir)`: the routing-analysis report.

Writes out_dir/analysis.json, CSV tables, PNG figures and report.md:
1. accuracy vs capacity (vanilla vs BPR, trained K and K=1) with the
   fraction of tokens processed per layer;
2. expert-vs-class heatmaps per layer and their normalised mutual information;
3. token maps (processed patches at low C under vanilla and BPR, priority,
   expert ids) for a few test images;
4. expert load before the capacity cut, dropped fraction per layer and C;
5. reliance on the experts: all MoE outputs zeroed, accuracy by position in
   the routing group under vanilla routing at low C, mean top gate vs 1/E.

The report is about sparse (top-K) routing. A Soft MoE model drops nothing,
so there is no capacity to sweep: `soft_model` adds it to the capacity sweep
as one point at matched compute, i.e. at the capacity factor whose expert
rows per token equal its slots per token, C_eq = E*p / (S*K).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..data.pipeline import eval_batches, to_model_range
from ..evaluate.classification import routing_grid
from ..models.ensemble import ensemble_log_probs
from ..utils.io import atomic_write_json, atomic_write_text
from . import plots
from .html import token_data, write_html
from .recording import record_routing
from .stats import (
    accuracy_by_group_position,
    class_expert_counts,
    expert_load,
    flatten_runs,
    normalized_mutual_information,
    processed_mask,
    row_shares,
)

CAPACITY_FACTORS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.05, 1.5, 2.0)


@torch.no_grad()
def _pass(model, ds, batch_size: int, record: bool = False):
    """Predictions, labels and (optionally) recorded routing over `ds`."""
    model.eval()
    device = next(model.parameters()).device
    preds, labels = [], []
    with record_routing(model) if record else contextlib.nullcontext() as rec:
        for images, y in eval_batches(ds, batch_size):
            logits = model(to_model_range(images.to(device)))
            preds.append(ensemble_log_probs(logits, model.ensemble_size).argmax(-1).cpu())
            labels.append(y)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy(), rec


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def soft_moe_point(soft_model, test_ds, eval_batch_size: int, sparse_k: int) -> dict[str, Any]:
    """Accuracy of a Soft MoE model and its matched-compute capacity factor
    C_eq = E*p / (S*K): the C at which a top-K model with K=`sparse_k`
    sends as many token rows to the experts as Soft MoE sends slots."""
    layers = soft_model.moe_layers()
    if not layers or any(layer.routing.router != "soft" for layer in layers.values()):
        raise ValueError("soft_model must be a Soft MoE model (every MoE layer router='soft').")
    first = next(iter(layers.values()))
    slots = first.router.num_slots
    group = first.group_size or soft_model.config.tokens_per_image
    preds, labels, _ = _pass(soft_model, test_ds, eval_batch_size)
    return {"slots_per_expert": slots, "num_experts": first.num_experts, "group_size": group,
            "slots_per_token": first.num_experts * slots / group,
            "equivalent_capacity_factor": first.num_experts * slots / (group * sparse_k),
            "test_accuracy": float((preds == labels).mean())}


@dataclass
class _Run:
    """What every section of the analysis reads."""

    model: Any
    test_ds: Any
    out_dir: str
    eval_batch_size: int
    layers: dict[str, Any]
    num_experts: int
    trained_k: int
    group_size: int
    tokens_per_image: int

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)


def analyze(model, test_ds, out_dir: str, eval_batch_size: int = 128,
            capacity_factors: Sequence[float] = CAPACITY_FACTORS, low_capacity: float = 0.5,
            num_map_images: int = 4, sweep_rows: Optional[list[dict]] = None,
            soft_model=None) -> dict[str, Any]:
    """The routing analysis of a top-K model on `test_ds`: capacity sweep,
    specialisation, token maps, expert load and reliance on the experts;
    writes analysis.json, report.md, CSVs and figures to `out_dir`, and
    report.html, one self-contained page of it all (with the model's
    calibration curve when it has one)."""
    layers = model.moe_layers()
    if not layers:
        raise ValueError("The analysis needs a model with MoE layers.")
    if any(layer.routing.router == "soft" for layer in layers.values()):
        raise ValueError("This routing analysis is for sparse (top-K) models: Soft MoE drops no "
                         "token and has no capacity to sweep. Analyse a top-K model and pass the "
                         "Soft MoE model as soft_model (vmoe analyze ... --soft-moe DIR).")
    os.makedirs(out_dir, exist_ok=True)
    first = next(iter(layers.values()))
    run = _Run(model, test_ds, out_dir, eval_batch_size, layers, first.num_experts,
               first.routing.num_selected_experts, first.group_size, model.config.tokens_per_image)
    result: dict[str, Any] = {"eval_batch_size": eval_batch_size, "num_test_images": len(test_ds),
                              "num_experts": run.num_experts, "trained_k": run.trained_k,
                              "group_size": run.group_size}
    sweep_rows = _capacity_sweep(run, result, capacity_factors, sweep_rows, soft_model)
    labels, load, gate_mean = _specialisation(run, result, capacity_factors)
    tokens = _token_maps(run, result, low_capacity, num_map_images)
    _expert_load(run, result, sweep_rows, load)
    _reliance(run, result, labels, gate_mean, low_capacity)
    atomic_write_json(run.path("analysis.json"), result)
    _write_report(result, out_dir)
    write_html(result, out_dir, tokens, getattr(model, "calibration", None))
    return result


def _capacity_sweep(run: _Run, result: dict[str, Any], capacity_factors: Sequence[float],
                    sweep_rows: Optional[list[dict]], soft_model: Any) -> list[dict]:
    """1. Accuracy over capacity factors, K and BPR (and a Soft MoE point)."""
    if sweep_rows is None:
        sweep_rows = routing_grid(run.model, lambda: eval_batches(run.test_ds, run.eval_batch_size),
                                  capacity_factors, sorted({run.trained_k, 1}, reverse=True), (False, True))
    result["capacity_sweep"] = sweep_rows
    if soft_model is not None:
        result["soft_moe"] = soft_moe_point(soft_model, run.test_ds, run.eval_batch_size, run.trained_k)
    _write_csv(run.path("capacity_sweep.csv"), sweep_rows)
    plots.plot_capacity_sweep(sweep_rows, run.path("capacity_sweep.png"), soft=result.get("soft_moe"))
    return sweep_rows


def _specialisation(run: _Run, result: dict[str, Any], capacity_factors: Sequence[float]):
    """2. Specialisation at full capacity (every token keeps its experts);
    returns (labels, expert load, mean top gate) for the later sections."""
    full_cf = float(max(max(capacity_factors), 4.0))
    with run.model.routing(capacity_factor=full_cf):
        preds, labels, rec = _pass(run.model, run.test_ds, run.eval_batch_size, record=True)
    token_class = np.repeat(labels, run.tokens_per_image)
    shares, nmi, load, gate_mean = {}, {}, {}, {}
    for name, runs in rec.items():
        flat = flatten_runs(runs)
        top1 = flat["expert"][:, 0].numpy()
        counts = class_expert_counts(top1, token_class, run.test_ds.num_classes, run.num_experts)
        shares[name] = row_shares(counts)
        nmi[name] = normalized_mutual_information(counts)
        load[name] = expert_load(flat["expert"], run.num_experts)
        gate_mean[name] = float(flat["gates"][:, 0].mean())
    result["full_capacity_accuracy"] = float((preds == labels).mean())
    result["specialisation"] = [{"layer": int(n.split("_")[-1]), "name": n, "value": nmi[n]} for n in run.layers]
    result["heatmaps"] = {n: s.tolist() for n, s in shares.items()}
    _write_csv(run.path("specialisation.csv"), result["specialisation"])
    plots.plot_heatmaps(shares, nmi, run.path("expert_class_heatmaps.png"))
    return labels, load, gate_mean


def _token_maps(run: _Run, result: dict[str, Any], low_capacity: float, num_map_images: int) -> dict[str, Any]:
    """3. Token maps at low capacity (vanilla vs BPR) on the first eval batch."""
    model, tokens = run.model, run.tokens_per_image
    prefix, (grid_h, grid_w) = model.num_prefix_tokens, model.pos_grid
    images, _ = next(iter(eval_batches(run.test_ds, run.eval_batch_size)))
    per_group = max(1, run.group_size // tokens)
    picks = np.linspace(0, min(per_group, len(images)) - 1, num_map_images).round().astype(int)
    maps: dict[str, dict[str, np.ndarray]] = {n: {} for n in run.layers}

    def per_img(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(len(images), tokens, *t.shape[1:])[picks, prefix:]

    for bpr in (False, True):
        with model.routing(num_selected_experts=run.trained_k, capacity_factor=low_capacity, batch_priority=bpr):
            with record_routing(model) as rec, torch.no_grad():
                model(to_model_range(images.to(next(model.parameters()).device)))
        for name, runs in rec.items():
            flat = flatten_runs(runs)
            maps[name]["bpr" if bpr else "vanilla"] = per_img(processed_mask(flat["kept"])).reshape(
                -1, grid_h, grid_w).float().numpy()
            if bpr:
                maps[name]["priority"] = per_img(flat["gates"][:, 0]).reshape(-1, grid_h, grid_w).numpy()
                maps[name]["expert"] = per_img(flat["expert"][:, 0]).reshape(-1, grid_h, grid_w).numpy()
    shown = images[picks, 0].float().numpy() / 255.0
    plots.plot_token_maps(shown, maps, run.path("token_maps.png"), low_capacity)
    result["token_maps"] = {"images": picks.tolist(), "capacity_factor": low_capacity,
                            "processed_fraction": {n: {k: float(maps[n][k].mean()) for k in ("vanilla", "bpr")}
                                                   for n in run.layers}}
    return token_data(shown, maps, picks.tolist())


def _expert_load(run: _Run, result: dict[str, Any], sweep_rows: list[dict], load: dict[str, Any]) -> None:
    """4. Expert load and dropped fraction per layer and C."""
    dropped = {}
    for r in sweep_rows:
        if r["num_selected_experts"] == run.trained_k and not r["batch_priority"]:
            dropped[r["capacity_factor"]] = {n: 1.0 - v for n, v in r["processed_fraction_per_layer"].items()}
    result["expert_load"] = {n: v.tolist() for n, v in load.items()}
    result["dropped_fraction"] = {str(c): v for c, v in sorted(dropped.items())}
    plots.plot_expert_load(load, dropped, run.path("expert_load.png"))


def _reliance(run: _Run, result: dict[str, Any], labels: np.ndarray, gate_mean: dict[str, float],
              low_capacity: float) -> None:
    """5. Reliance on the experts: ablation, accuracy by position in the group."""
    model = run.model
    with model.routing(ablate=True):
        p_abl, _, _ = _pass(model, run.test_ds, run.eval_batch_size)
    ablation = {"full capacity": result["full_capacity_accuracy"],
                "MoE outputs zeroed": float((p_abl == labels).mean())}
    position = {}
    for cf in sorted({low_capacity, 0.25}):
        for bpr in (False, True):
            with model.routing(num_selected_experts=run.trained_k, capacity_factor=cf, batch_priority=bpr):
                p, _, _ = _pass(model, run.test_ds, run.eval_batch_size)
            position[f"C={cf} {'BPR' if bpr else 'vanilla'}"] = accuracy_by_group_position(
                p == labels, run.tokens_per_image, run.group_size)
    result["ablation"] = ablation
    result["accuracy_by_group_position"] = position
    result["gate_stats"] = [{"layer": n, "mean_top_gate": gate_mean[n], "uniform": 1.0 / run.num_experts}
                            for n in run.layers]
    plots.plot_reliance(ablation, position, gate_mean, run.num_experts, run.path("reliance.png"))


def _acc(rows, cf, k, bpr):
    for r in rows:
        if r["capacity_factor"] == cf and r["num_selected_experts"] == k and r["batch_priority"] == bpr:
            return r["test_accuracy"]
    return float("nan")


def _write_report(res: dict[str, Any], out_dir: str) -> None:
    k = res["trained_k"]
    cfs = sorted({r["capacity_factor"] for r in res["capacity_sweep"]})
    ks = sorted({r["num_selected_experts"] for r in res["capacity_sweep"]}, reverse=True)
    lines = ["# Routing analysis", "",
             f"{res['num_test_images']} test images, evaluation batch size {res['eval_batch_size']}, "
             f"E={res['num_experts']}, trained K={k}, routing groups of {res['group_size']} tokens.", "",
             "## 1. Accuracy vs capacity", "", "![capacity sweep](capacity_sweep.png)", "",
             "| C | " + " | ".join(f"K={kk} vanilla | K={kk} BPR" for kk in ks) + " |",
             "|---|" + "---|" * (2 * len(ks))]
    for cf in cfs:
        cells = [f"{_acc(res['capacity_sweep'], cf, kk, b):.4f}" for kk in ks for b in (False, True)]
        lines.append(f"| {cf} | " + " | ".join(cells) + " |")
    soft = res.get("soft_moe")
    if soft:
        lines += ["", f"Soft MoE at matched compute: {soft['slots_per_expert']} slots per expert, "
                  f"{soft['slots_per_token']:.3f} expert rows per token (C_eq = "
                  f"{soft['equivalent_capacity_factor']:.3f} at K={k}): test accuracy "
                  f"{soft['test_accuracy']:.4f}. Nothing is dropped at any C."]
    lines += ["", "## 2. Expert vs class", "", "![heatmaps](expert_class_heatmaps.png)", "",
              "| layer | normalised mutual information (class; top-1 expert) |", "|---|---|"]
    lines += [f"| {s['name']} | {s['value']:.4f} |" for s in res["specialisation"]]
    lines += ["", "## 3. Token maps", "", "![token maps](token_maps.png)", "",
              "## 4. Expert load", "", "![expert load](expert_load.png)", "",
              "## 5. Reliance on the experts", "", "![reliance](reliance.png)", "",
              "| setting | test accuracy |", "|---|---|"]
    lines += [f"| {n} | {v:.4f} |" for n, v in res["ablation"].items()]
    lines += ["", "| layer | mean top gate | uniform 1/E |", "|---|---|---|"]
    lines += [f"| {g['layer']} | {g['mean_top_gate']:.3f} | {g['uniform']:.3f} |" for g in res["gate_stats"]]
    lines += ["", "Accuracy by image position inside the routing group:", ""]
    for name, accs in res["accuracy_by_group_position"].items():
        lines.append(f"- {name}: " + ", ".join(f"{a:.3f}" for a in accs))
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(lines) + "\n")
