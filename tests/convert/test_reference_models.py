"""Converted reference checkpoints reproduce the reference's outputs
(fixtures: tiny models saved by google-research/vmoe, see ORIGIN.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODEL_CASES, MODELS, npz

from vmoe_torch.convert import load_reference_config, model_from_reference

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)


def _load(case):
    d = MODELS / case
    model = model_from_reference(str(d / "ckpt"), load_reference_config(str(d / "config.json")))
    images = torch.from_numpy(np.load(d / "images.npy")).permute(0, 3, 1, 2)
    return d, model, images


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _bf16_rounding_effect(model, images, logits) -> float:
    """How much the bfloat16 rounding of the MoE dispatch moves the logits,
    measured on the same model and images (0 where nothing is rounded).

    Where bf16 rounding sits in the path, a last-bit difference of float32
    kernels (other CPUs block GEMMs differently) can push a value across a
    rounding boundary: it then rounds to the other neighbour, one bf16 ulp
    away, a change at most twice that value's own rounding error. A few such
    flips move the logits by at most twice the effect of all the rounding,
    so the bound is 1e-5 (float32) + 2 x this relative effect."""
    if not any(layer.routing.effective_bfloat16 for layer in model.moe_layers().values()):
        return 0.0
    with torch.no_grad(), model.routing(bfloat16_dispatch=False):
        unrounded = model(images)
    return _rel(logits.numpy(), unrounded.numpy())


@pytest.mark.parametrize("case", MODEL_CASES)
def test_logits_pre_logits_and_metrics(case):
    d, model, images = _load(case)
    assert not model.training
    with torch.no_grad():
        feats = model.forward_features(images)
        metrics = model.metrics
        logits = model.forward_head(feats, members=True)  # E^3: the reference's member rows
        pooled = model.pool(feats)
        pre = model.pre_logits(pooled) if model.pre_logits is not None else pooled
    tol = 1e-5 + 2 * _bf16_rounding_effect(model, images, logits)
    assert _rel(logits.numpy(), np.load(d / "logits.npy")) <= tol
    assert _rel(pre.numpy(), np.load(d / "pre_logits.npy")) <= tol
    ref_metrics = npz(d / "metrics.npz")
    for key, value in ref_metrics.items():
        if key == "auxiliary_loss":
            np.testing.assert_allclose(float(metrics[key]), value.mean(), rtol=1e-4, atol=1e-6)
        else:
            np.testing.assert_allclose(metrics[key].numpy(), value, rtol=1e-4, atol=1e-6, err_msg=key)


TOP_K_CASES = [c for c in MODEL_CASES if (MODELS / c / "routing_stats.json").exists()]


@pytest.mark.parametrize("case", TOP_K_CASES)
def test_router_intermediates(case):
    """Router logits and the routing plan of every MoE layer match."""
    d, model, images = _load(case)
    inter = npz(d / "intermediates.npz")
    captured = {}
    for name, layer in model.moe_layers().items():
        layer.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, inp[0]))
    with torch.no_grad():
        model(images)
    for name, layer in model.moe_layers().items():
        prefix = f"Encoder/{name}/Moe/Router"
        tokens = captured[name].reshape(-1, layer.group_size, layer.dim)
        logits = layer.router_logits(tokens).detach()
        np.testing.assert_allclose(logits.numpy(), inter[f"{prefix}/dense/__call__/0"], atol=2e-5)
        gates = torch.softmax(logits, -1)
        from vmoe_torch.moe import routing_to_dense, top_experts_per_item
        r = layer.routing
        routing = top_experts_per_item(gates, r.num_selected_experts, layer.capacity_for(layer.group_size),
                                       r.batch_priority)
        if f"{prefix}/__call__/0/0/indices" in inter:
            ours = torch.stack([routing.expert_index, routing.buffer_index], -1).numpy()
            np.testing.assert_array_equal(ours, inter[f"{prefix}/__call__/0/0/indices"])
        else:  # einsum dispatcher (wrapped as "dispatcher/" when bfloat16)
            key = next(k for k in inter if k.startswith(f"{prefix}/__call__/0/0/")
                       and k.endswith("dispatch_weights"))
            mask = routing_to_dense(routing, gates).numpy() > 0
            np.testing.assert_array_equal(mask, inter[key])


def test_train_mode_with_injected_router_noise():
    d, model, images = _load("b_token_repr_e4_k2_bpr_drop")
    tm = npz(d / "train_mode.npz")
    noise = {k.split("/")[1]: torch.from_numpy(v) for k, v in tm.items() if k.startswith("std_normal_draw/")}
    model.train()
    with torch.no_grad():
        logits, metrics = model(images, return_metrics=True, router_noise=noise)
    assert _rel(logits.numpy(), tm["logits"]) <= 1e-5
    for key, value in tm.items():
        if key.startswith("metrics/encoderblock"):
            name = key[len("metrics/"):]
            np.testing.assert_allclose(metrics[name].numpy(), value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_bfloat16_dispatch_matches_reference_and_differs_from_fp32():
    d, model, images = _load("f_token_bf16_dispatch_e4_k2")
    assert all(layer.routing.bfloat16_dispatch for layer in model.moe_layers().values())
    with torch.no_grad():
        bf16 = model(images).numpy()
        with model.routing(bfloat16_dispatch=False):
            fp32 = model(images).numpy()
    assert _rel(bf16, np.load(d / "logits.npy")) <= 1e-5
    assert _rel(fp32, np.load(d / "logits_fp32_dispatch.npy")) <= 1e-5
    assert np.abs(bf16 - fp32).max() > 1e-4
