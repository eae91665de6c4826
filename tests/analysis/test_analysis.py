"""Routing statistics and the analysis report on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vmoe_torch.analysis.recording import record_routing
from vmoe_torch.analysis.report import analyze
from vmoe_torch.analysis.stats import (
    class_expert_counts,
    flatten_runs,
    normalized_mutual_information,
    processed_mask,
    row_shares,
)
from vmoe_torch.data.pipeline import eval_batches, to_model_range


def test_heatmap_rows_sum_to_one_and_nmi_bounds():
    counts = np.array([[5, 0, 1], [0, 0, 0], [2, 2, 2]])
    shares = row_shares(counts)
    np.testing.assert_allclose(shares.sum(1), [1, 0, 1])
    assert normalized_mutual_information(np.diag([10, 10, 10])) == pytest.approx(1.0)
    assert normalized_mutual_information(np.full((3, 4), 7)) == pytest.approx(0.0, abs=1e-12)
    c = class_expert_counts(np.array([0, 1, 1]), np.array([2, 0, 0]), 3, 2)
    assert c.tolist() == [[0, 2], [0, 0], [1, 0]]


def test_processed_fraction_matches_dispatcher(trained):
    model, ds = trained.model, trained.test_ds
    images, _ = next(iter(eval_batches(ds, 32)))
    for cf, expect_all in ((8.0, True), (0.25, False)):
        with model.routing(capacity_factor=cf), record_routing(model) as rec, torch.no_grad():
            _, metrics = model(to_model_range(images), return_metrics=True)
        for name, runs in rec.items():
            frac = float(processed_mask(flatten_runs(runs)["kept"]).float().mean())
            assert len(runs) == 1  # 32 images x 17 tokens = 16 full groups of 34
            assert frac == pytest.approx(1.0 - float(metrics[f"{name}/no_expert_fraction"].mean()), abs=1e-6)
            assert (frac == 1.0) == expect_all


def test_bpr_at_low_capacity_keeps_top_priority_tokens(trained):
    model, ds = trained.model, trained.test_ds
    images, _ = next(iter(eval_batches(ds, 32)))
    with model.routing(capacity_factor=0.25, batch_priority=True, num_selected_experts=1), \
            record_routing(model) as rec, torch.no_grad():
        model(to_model_range(images))
    for runs in rec.values():
        for run in runs:
            kept = run["buffer_index"][..., 0] < run["capacity"]
            prio = run["gates"][..., 0]
            expert = run["expert_index"][..., 0]
            for g in range(kept.shape[0]):
                for e in expert[g].unique():
                    m = expert[g] == e
                    k, p = kept[g][m], prio[g][m]
                    assert int(k.sum()) == min(int(m.sum()), int(run["capacity"]))
                    if k.any() and (~k).any():
                        assert float(p[k].min()) >= float(p[~k].max())


def test_report_renders(trained, tmp_path):
    out = tmp_path / "analysis"
    res = analyze(trained.model, trained.test_ds, str(out), 32, capacity_factors=(0.25, 1.0, 4.0),
                  num_map_images=2)
    data = json.load(open(out / "analysis.json"))
    assert {"capacity_factor", "num_selected_experts", "batch_priority", "test_accuracy",
            "processed_fraction", "processed_fraction_per_layer"} <= set(data["capacity_sweep"][0])
    assert [s["layer"] for s in data["specialisation"]] == [0, 1]
    for layer, rows in data["heatmaps"].items():
        sums = np.array(rows).sum(1)
        assert np.all((np.abs(sums - 1) < 1e-9) | (sums == 0))
    full = [r for r in data["capacity_sweep"] if r["capacity_factor"] == 4.0]
    assert all(r["processed_fraction"] == 1.0 for r in full)
    from PIL import Image
    for png in ("capacity_sweep.png", "expert_class_heatmaps.png", "token_maps.png", "expert_load.png",
                "reliance.png"):
        path = out / png
        assert path.stat().st_size > 10_000, png
        w, h = Image.open(path).size
        assert w >= 400 and h >= 200, (png, w, h)
    report = (out / "report.md").read_text()
    assert "capacity_sweep.png" in report and "normalised mutual information" in report
    assert (out / "capacity_sweep.csv").exists()
    # The analysis leaves routing settings as they were.
    assert all(layer.routing.capacity_factor == 1.05 and not layer.router._forward_hooks
               for layer in trained.model.moe_layers().values())
    assert 0 <= res["ablation"]["MoE outputs zeroed"] <= 1


def test_soft_moe_point_at_matched_compute_and_soft_models_rejected(trained, tmp_path):
    import dataclasses

    from vmoe_torch import RoutingConfig, VisionTransformerMoe
    from vmoe_torch.analysis.report import soft_moe_point
    cfg = trained.model.config
    soft_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, group_size=cfg.tokens_per_image,
        routing=RoutingConfig(router="soft", num_slots=2, capacity_factor=None)))
    soft = VisionTransformerMoe(soft_cfg)
    point = soft_moe_point(soft, trained.test_ds, 64, sparse_k=2)
    e = cfg.moe.num_experts
    assert point["slots_per_token"] == pytest.approx(e * 2 / cfg.tokens_per_image)
    assert point["equivalent_capacity_factor"] == pytest.approx(e * 2 / (cfg.tokens_per_image * 2))
    assert 0.0 <= point["test_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="sparse"):
        analyze(soft, trained.test_ds, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="Soft MoE model"):
        soft_moe_point(trained.model, trained.test_ds, 64, sparse_k=2)
    from vmoe_torch.analysis.plots import plot_capacity_sweep
    rows = [{"capacity_factor": c, "num_selected_experts": 2, "batch_priority": b, "test_accuracy": 0.5,
             "processed_fraction": 0.9} for c in (0.5, 1.0) for b in (False, True)]
    plot_capacity_sweep(rows, str(tmp_path / "sweep.png"), soft=point)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_one_self_contained_html_page_with_the_calibration_curve(trained, tmp_path):
    """report.html: every figure and datum inline (nothing fetched), the
    token maps as data a script draws, and the accuracy-compute curve of a
    calibrated model."""
    import re

    from helpers import calibrated_report
    page = open(calibrated_report(trained, tmp_path)).read()
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith("data:") for s in sources)  # nothing outside the file
    assert page.count("data:image/png;base64,") == 5
    assert "<polyline" in page and page.count("<circle") == 3  # the points, and the frontier as a line
    data = json.loads(re.search(r"<script type='application/json' id='token-data'>(.*?)</script>", page, re.S)
                      .group(1).replace("<\\/", "</"))
    assert data["layers"] == list(trained.model.moe_layers()) and len(data["images"]) == 2
    grid = data["maps"][data["layers"][0]]["expert"][0]
    assert len(grid) == trained.model.pos_grid[0] and len(grid[0]) == trained.model.pos_grid[1]
    for heading in ("Accuracy against compute", "BPR against vanilla", "Expert usage", "Token maps"):
        assert heading in page
    bare = tmp_path / "bare"
    analyze(trained.model, trained.test_ds, str(bare), 32, capacity_factors=(1.0,), num_map_images=1)
    assert "vmoe calibrate" in (bare / "report.html").read_text()


def test_the_token_map_script_runs_and_hovers(trained, tmp_path):
    """The page's script, run by node against a minimal DOM (no browser
    here): it draws four maps per image and a hovered patch names its
    routing. Skipped where node is not installed."""
    import shutil
    import subprocess
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    analyze(trained.model, trained.test_ds, str(tmp_path), 32, capacity_factors=(1.0,), num_map_images=2)
    harness = tmp_path / "dom.js"
    harness.write_text(r"""
const fs=require('fs');const page=fs.readFileSync(process.argv[2],'utf8');
const data=page.match(/<script type='application\/json' id='token-data'>([\s\S]*?)<\/script>/)[1];
const script=page.match(/<script>([\s\S]*?)<\/script>/)[1];
function el(tag){return {tag,children:[],style:{},appendChild(c){this.children.push(c);},
 set innerHTML(v){this.children=[];}, getContext(){return {fillRect(){},set fillStyle(v){}};},
 getBoundingClientRect(){return {left:0,top:0,width:120,height:120};}};}
const nodes={'token-data':{textContent:data},tip:el('div'),maps:el('div')};
global.document={getElementById:id=>nodes[id],createElement:el};
eval(script);
const canvases=[];(function walk(n){if(n.tag==='canvas')canvases.push(n);(n.children||[]).forEach(walk);})(nodes.maps);
canvases[0].onmousemove({clientX:10,clientY:10});
console.log(JSON.stringify({canvases:canvases.length,tip:nodes.tip.textContent}));
""")
    out = subprocess.run([node, str(harness), str(tmp_path / "report.html")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["canvases"] == 2 * 4 and got["tip"].startswith("patch (0, 0): vanilla ")
