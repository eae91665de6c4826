"""Accuracy against compute: the frontier rule (properties), measuring a
model (`vmoe calibrate`), storing the curve with the model, and choosing a
budget (`model.at_budget`, `vmoe eval --budget`)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_torch import create_model, from_pretrained
from vmoe_torch.data.pipeline import build_datasets, eval_batches
from vmoe_torch.evaluate.calibration import calibrate, count_flops
from vmoe_torch.storage.calibration import Calibration, Point, choose, parse_request

_POINTS = st.lists(st.tuples(st.floats(0.0, 1.0), st.floats(1.0, 100.0)), min_size=1, max_size=12)


def _cal(pairs, reference=0):
    return Calibration([Point({"capacity_factor": i}, top1, flops) for i, (top1, flops) in enumerate(pairs)],
                       reference)


@settings(max_examples=200, deadline=None)
@given(_POINTS, st.floats(0.01, 2.0))
def test_a_flops_request_gets_the_most_accurate_point_within_it(pairs, relative):
    cal = _cal(pairs)
    budget = relative * cal.full.flops_per_image
    fitting = [p for p in cal.points if p.flops_per_image <= budget * (1 + 1e-9)]  # the rule's rounding slack
    if not fitting:
        with pytest.raises(ValueError, match="cheapest is"):
            choose(cal, relative=relative)
        return
    chosen = choose(cal, relative=relative)
    assert chosen.flops_per_image <= budget * (1 + 1e-9)
    assert chosen.top1 == max(p.top1 for p in fitting)  # no point within the budget does better


@settings(max_examples=200, deadline=None)
@given(_POINTS, st.floats(0.0, 0.5))
def test_an_accuracy_drop_request_gets_the_cheapest_point_that_keeps_it(pairs, drop):
    cal = _cal(pairs)
    chosen = choose(cal, accuracy_drop=drop)
    floor = cal.full.top1 - drop
    assert chosen.top1 >= floor - 1e-12
    assert chosen.flops_per_image == min(p.flops_per_image for p in cal.points if p.top1 >= floor - 1e-12)


def test_requests_are_checked():
    cal = _cal([(0.8, 10.0), (0.7, 5.0)])
    for bad in ({}, {"relative": 0.5, "flops": 3.0}, {"relative": -1.0}, {"accuracy_drop": -0.1}):
        with pytest.raises(ValueError):
            choose(cal, **bad)
    assert parse_request("relative=0.5") == {"relative": 0.5}
    for bad in ("half", "relative=x", "speed=2"):
        with pytest.raises(ValueError, match="Budget"):
            parse_request(bad)
    with pytest.raises(ValueError, match="version"):
        Calibration.from_json({**cal.to_json(), "version": 99})


def test_fused_cpu_attention_counts_as_its_two_matmuls():
    """torch's FLOP registry has no formula for the CPU's fused attention; the
    count must equal the unfused (math) attention's, whose matmuls torch counts."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = create_model("vmoe_mi4_every2_e8_k2").eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    fused = count_flops(model, x)
    with sdpa_kernel(SDPBackend.MATH):
        unfused = count_flops(model, x)
    n, d = model.config.tokens_per_image, model.config.hidden_size
    attention = 4 * n * n * d * model.config.num_layers  # QK^T and AV per image
    assert unfused == fused and unfused > attention > 0


def test_dropless_flops_are_counted_from_the_routed_rows():
    model = create_model("vmoe_mi4_every2_e8_k2").eval()
    x = torch.rand(16, 3, 32, 32) * 2 - 1
    counts = {}
    for k in (1, 2):
        with model.routing(num_selected_experts=k, dropless=True):
            counts[k] = count_flops(model, x)
    dense = count_flops(create_model("vmoe_dense_mi4").eval(), x)
    # K=2 runs twice the expert rows of K=1: the difference is one expert MLP per token and MoE layer
    # (two (D, H) matmuls), plus the weighted sum of the K=2 outputs (a (1, K) x (K, D) bmm per token).
    d, h = model.config.hidden_size, model.config.mlp_dim
    per_token = 2 * 2 * d * h + 2 * 2 * d
    expected = per_token * model.config.tokens_per_image * len(model.moe_layers())
    assert counts[2] - counts[1] == expected
    assert counts[1] == pytest.approx(dense, rel=0.01)  # K=1 dropless: one expert MLP per token, as dense


@pytest.fixture(scope="module")
def calibrated(trained, tmp_path_factory):
    from vmoe_torch.config import load_config
    cfg = load_config(None, TINY)
    _, test = build_datasets(cfg.data)
    model = trained.model.eval()
    before = model.routing_settings()
    cal = calibrate(model, lambda: eval_batches(test, 64), batch_size=32, repeats=1,
                    capacity_factors=(0.25, 1.05, 2.0))
    assert model.routing_settings() == before  # every measured setting was undone
    return model, cal


def test_calibrate_measures_every_setting_and_restores_the_routing(calibrated):
    model, cal = calibrated
    own = next(iter(model.moe_layers().values())).routing
    assert cal.full.routing["capacity_factor"] == own.capacity_factor
    assert len(cal.points) == 1 + 2 * 3 * 2 + 2 - 1  # own, K x C x BPR, dropless per K; own counted once
    by = {(p.routing["num_selected_experts"], p.routing["capacity_factor"], p.routing["batch_priority"],
           p.routing["dropless"]): p for p in cal.points}
    assert by[(2, 0.25, False, False)].flops_per_image < by[(2, 2.0, False, False)].flops_per_image
    assert by[(1, 1.05, True, False)].flops_per_image < by[(2, 1.05, True, False)].flops_per_image
    assert all(p.latency_ms > 0 and 0 <= p.top1 <= 1 for p in cal.points)
    frontier = cal.frontier()
    assert [p.flops_per_image for p in frontier] == sorted(p.flops_per_image for p in frontier)
    assert all(a.top1 < b.top1 for a, b in zip(frontier, frontier[1:]))


def test_at_budget_applies_the_choice_and_restores_it_as_a_context(calibrated, tmp_path):
    model, cal = calibrated
    before = model.routing_settings()
    with pytest.raises(ValueError, match="vmoe calibrate"):
        create_model("vmoe_mi4_every2_e8_k2").at_budget(relative=0.5)
    model.calibration = cal
    try:
        with model.at_budget(relative=0.8) as chosen:
            layer = next(iter(model.moe_layers().values())).routing
            assert layer.num_selected_experts == chosen.routing["num_selected_experts"]
            assert layer.capacity_factor == chosen.routing["capacity_factor"]
            assert chosen.flops_per_image <= 0.8 * cal.full.flops_per_image
        assert model.routing_settings() == before
        model.save_pretrained(str(tmp_path / "m"))
    finally:
        model.calibration = None
    back = from_pretrained(str(tmp_path / "m"))
    assert back.calibration is not None and back.calibration.to_json() == cal.to_json()
    assert "## Compute budgets" in (tmp_path / "m" / "README.md").read_text()
    setting = back.at_budget(accuracy_drop=0.0)
    assert setting.point.top1 >= cal.full.top1


def test_soft_moe_has_nothing_to_calibrate():
    with pytest.raises(ValueError, match="Soft MoE"):
        calibrate(create_model("vmoe_soft_mi4_half"), lambda: [])


def test_cli_calibrate_then_eval_at_a_budget(trained, tmp_path):
    from vmoe_torch.cli.main import main
    trained.model.save_pretrained(str(tmp_path / "m"))
    sets = [a for o in TINY for a in ("--set", o)]
    assert main(["eval", str(tmp_path / "m"), *sets, "--budget", "relative=0.7"]) == 2  # no calibration yet
    assert main(["calibrate", str(tmp_path / "m"), *sets, "--capacity-factors", "0.5,1.05",
                 "--num-selected-experts", "1,2", "--repeats", "1"]) == 0
    data = json.loads((tmp_path / "m" / "calibration.json").read_text())
    assert data["format"] == "vmoe-torch-calibration" and len(data["points"]) == 1 + 2 * 2 * 2 + 2 - 1
    assert main(["eval", str(tmp_path / "m"), *sets, "--budget", "accuracy_drop=0.02",
                 "--out", str(tmp_path / "e.json")]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["budget"]["flops_per_image"] <= max(p["flops_per_image"] for p in data["points"])
    assert main(["calibrate", str(tmp_path / "nothere"), *sets]) == 2
