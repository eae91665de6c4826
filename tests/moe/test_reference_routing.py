"""Parity with the reference dispatchers, capacity and auxiliary losses
(fixtures produced by google-research/vmoe; see fixtures/reference/ORIGIN.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROUTING, load_json, npz

from vmoe_torch.moe import (
    RoutingConfig,
    compute_capacity,
    dense_combine_weights,
    gshard_loss,
    importance_loss,
    load_loss,
    top_experts_per_item,
    top_items_metrics,
    top_items_per_expert,
    top_items_to_dense,
)
from vmoe_torch.moe.layer import MoeMlp

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)

TOP_EXPERTS = load_json(ROUTING / "top_experts_manifest.json")["cases"]
TOP_ITEMS = load_json(ROUTING / "top_items_manifest.json")["cases"]
CAPACITY_ROWS = load_json(ROUTING / "compute_capacity.json")["rows"]
AUX = npz(ROUTING / "aux_losses.npz")
AUX_CASES = sorted({k.split("/")[0] for k in AUX})
ROUTER_RUNS = load_json(ROUTING / "router_runs_manifest.json")["runs"]


def _capacity(case) -> int:
    if case["capacity"] is not None:
        return case["capacity"]
    return compute_capacity(case["S"] * case.get("K", 1), case["E"], case["capacity_factor"],
                            case["capacity_ceil_or_round"], case["capacity_multiple_of"])


def test_compute_capacity_all_rows():
    assert len(CAPACITY_ROWS) == 3377
    for row in CAPACITY_ROWS:
        args = (row["num_tokens"], row["num_experts"], row["capacity_factor"],
                row["ceil_or_round"], row["multiple_of"])
        if row["error"] is not None:
            with pytest.raises(ValueError):
                compute_capacity(*args)
        else:
            assert compute_capacity(*args) == row["capacity"], row


@pytest.mark.parametrize("case", TOP_EXPERTS, ids=[c["name"] for c in TOP_EXPERTS])
def test_top_experts_per_item(case):
    data = npz(ROUTING / case["file"])
    gates = torch.from_numpy(data["gates"])[None]
    if "error" in case:
        settings = dict(num_selected_experts=case["K"], capacity=case["capacity"],
                        capacity_factor=case["capacity_factor"],
                        capacity_ceil_or_round=case["capacity_ceil_or_round"],
                        capacity_multiple_of=case["capacity_multiple_of"])
        with pytest.raises(ValueError):
            RoutingConfig(**settings).validate(case["E"])
            _capacity(case)
        return
    capacity = _capacity(case)
    assert capacity == int(data["capacity"]) == case["capacity_used"]
    routing = top_experts_per_item(gates, case["K"], capacity, case["batch_priority"])
    indices = torch.stack([routing.expert_index, routing.buffer_index], -1)[0].numpy()
    np.testing.assert_array_equal(indices, data["indices"])
    np.testing.assert_array_equal(routing.combine_weights[0].numpy(), data["indices_combine_weights"])
    dense = dense_combine_weights(gates, case["K"], capacity, case["batch_priority"])[0].numpy()
    np.testing.assert_array_equal(dense, data["einsum_combine_weights"])
    np.testing.assert_array_equal(dense > 0, data["einsum_dispatch_weights"])
    assert int(routing.kept.sum()) == case["num_assignments_kept"]


@pytest.mark.parametrize("case", TOP_ITEMS, ids=[c["name"] for c in TOP_ITEMS])
def test_top_items_per_expert(case):
    data = npz(ROUTING / case["file"])
    gates = torch.from_numpy(data["gates"])[None]
    capacity = _capacity(case)
    assert capacity == int(data["capacity"])
    routing = top_items_per_expert(gates, capacity)
    dense = top_items_to_dense(routing, gates)[0].numpy()
    np.testing.assert_array_equal(dense, data["einsum_combine_weights"])
    np.testing.assert_array_equal(dense > 0, data["einsum_dispatch_weights"])
    metrics = top_items_metrics(routing, gates.shape[1])
    names = [k[len("metric/"):] for k in data if k.startswith("metric/")]
    assert names and set(names) == set(metrics)
    for name in names:
        np.testing.assert_allclose(metrics[name][0].numpy(), data["metric/" + name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("case", AUX_CASES)
def test_auxiliary_losses(case):
    d = {k.split("/", 1)[1]: torch.from_numpy(np.asarray(v)) for k, v in AUX.items() if k.startswith(case + "/")}
    gates = torch.softmax(d["logits"], -1)
    np.testing.assert_allclose(gates.numpy(), d["gates_softmax"].numpy(), atol=1e-6)
    tol = dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(importance_loss(d["gates_softmax"]).numpy(), d["importance_loss"].numpy(), **tol)
    np.testing.assert_allclose(gshard_loss(d["gates_softmax"]).numpy(), d["gshard_loss"].numpy(), **tol)
    np.testing.assert_allclose(gshard_loss(d["gates_softmax_noisy"]).numpy(), d["gshard_loss_noisy"].numpy(), **tol)
    got = load_loss(d["logits"], d["logits_noisy"], float(d["noise_std"]), int(d["num_selected_experts"]))
    np.testing.assert_allclose(got.numpy(), d["load_loss"].numpy(), rtol=1e-6, atol=1e-6)
    # Float64 re-computation of the importance loss agrees too.
    g64 = d["gates_softmax"].double().sum(1)
    np.testing.assert_allclose((g64.var(-1, unbiased=False) / g64.mean(-1) ** 2).numpy(),
                               d["importance_loss"].numpy(), rtol=1e-5)


@pytest.mark.parametrize("run", ROUTER_RUNS, ids=[r["name"] for r in ROUTER_RUNS])
def test_router_module(run):
    """The whole router (gating Dense, noise injection, losses, dispatch) of MoeMlp."""
    data = npz(ROUTING / run["file"])
    disp = dict(run["dispatcher"])
    disp.pop("name")
    layer = MoeMlp(run["D"], 4, run["E"], num_selected_experts=run["K"],
                   group_size=run["S"], noise_std=run["noise_std"],
                   gshard_loss_weight=run["gshard_loss_weight"],
                   importance_loss_weight=run["importance_loss_weight"],
                   load_loss_weight=run["load_loss_weight"], **disp)
    with torch.no_grad():
        layer.router.weight.copy_(torch.from_numpy(data["kernel"]).T)
    x = torch.from_numpy(data["inputs"])
    layer.train(not run["deterministic"])
    logits = layer.router_logits(x)
    np.testing.assert_allclose(logits.detach().numpy(), data["logits"], atol=1e-6)
    draw = torch.from_numpy(data["std_normal_draw"]) if "std_normal_draw" in data else None
    _, metrics = layer(x.reshape(-1, run["S"], run["D"]), noise=draw)
    for name in ("auxiliary_loss", "gshard_loss", "importance_loss", "load_loss"):
        key = "metric/" + name
        if key in data:
            ours = metrics["auxiliary_loss_per_group" if name == "auxiliary_loss" else name]
            np.testing.assert_allclose(ours.detach().numpy(), data[key], rtol=1e-6, atol=1e-6, err_msg=name)
    assert int(metrics["capacity"]) == int(data["dispatcher/capacity"])
    gates = torch.from_numpy(data["gates_softmax_noisy" if draw is not None else "gates_softmax"])
    routing = top_experts_per_item(gates, run["K"], int(data["dispatcher/capacity"]), disp["batch_priority"])
    if "dispatcher/indices" in data:
        np.testing.assert_array_equal(torch.stack([routing.expert_index, routing.buffer_index], -1).numpy(),
                                      data["dispatcher/indices"])
    else:
        dense = dense_combine_weights(gates, run["K"], int(data["dispatcher/capacity"]), disp["batch_priority"])
        np.testing.assert_allclose(dense.numpy(), data["dispatcher/combine_weights"], atol=1e-7)
