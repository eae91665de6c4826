"""Soft MoE (cases g, h) and E^3 (case i) reference models: the routers'
intermediates, the ensemble evaluation, and the native round trip
(fixtures: tests/fixtures/reference, see ORIGIN.md)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODELS, npz

from vmoe_torch.convert import load_reference_config, model_from_reference
from vmoe_torch.convert.reference import model_to_reference
from vmoe_torch.models import ensemble_log_probs
from vmoe_torch.moe import routing_to_dense, top_experts_per_item
from vmoe_torch.moe.soft import l2_normalize, soft_router_logits, soft_weights

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)

SOFT_CASES = ["g_soft_moe_e4_gap", "h_soft_moe_e8_slots2_token"]
E3_CASE = "i_eee_ensemble_e4_m2_k2"


def _load(case):
    d = MODELS / case
    model = model_from_reference(str(d / "ckpt"), load_reference_config(str(d / "config.json")))
    images = torch.from_numpy(np.load(d / "images.npy")).permute(0, 3, 1, 2)
    return d, model, images


def _capture(model):
    """MoE inputs (after LayerNorm) and outputs of every MoE layer."""
    seen = {}
    for name, layer in model.moe_layers().items():
        layer.register_forward_hook(
            lambda mod, inp, out, name=name: seen.__setitem__(name, (inp[0], out[0])))
    return seen


@pytest.mark.parametrize("case", SOFT_CASES)
def test_soft_router_weights_slots_and_outputs(case):
    """Each Soft MoE layer, fed the reference's own input to it (its
    LayerNorm_1 output), reproduces the reference's router weights, slot
    count and output."""
    d, model, images = _load(case)
    inter = npz(d / "intermediates.npz")
    for name, layer in model.moe_layers().items():
        router = layer.router
        assert router.kind == "soft"
        prefix = f"Encoder/{name}/Moe"
        x = torch.from_numpy(inter[f"Encoder/{name}/LayerNorm_1/__call__/0"])
        groups = x.reshape(-1, layer.group_size, layer.dim)
        np.testing.assert_allclose(l2_normalize(router.mu.detach(), 0).numpy(),
                                   inter[f"{prefix}/Router/mu_unit/0"], atol=1e-6)
        logits, _ = soft_router_logits(groups, router.mu.detach(), router.scale.detach())
        dispatch, combine = soft_weights(logits)
        np.testing.assert_allclose(dispatch.numpy(), inter[f"{prefix}/Router/__call__/0/0/dispatcher/dispatch_weights"],
                                   atol=2e-6)
        np.testing.assert_allclose(combine.numpy(), inter[f"{prefix}/Router/__call__/0/0/dispatcher/combine_weights"],
                                   atol=2e-6)
        # Slot inputs enter the experts' first Dense: compare its output buffer (E, G*p, H).
        slot_rows = inter[f"{prefix}/Mlp/Dense_0/__call__/0"].shape[1]
        assert layer.capacity_for(layer.group_size) == slot_rows // groups.shape[0]
        with torch.no_grad():
            y = layer(x)[0].numpy()
            with_rounding_off = layer.routing.updated(bfloat16_dispatch=False)
            saved = layer.routing
            layer.apply_routing(with_rounding_off)
            unrounded = layer(x)[0].numpy()
            layer.apply_routing(saved)
        ref = inter[f"{prefix}/__call__/0/0"]
        _assert_close_up_to_bf16_flips(y, ref, rounding_effect=float(np.abs(y - unrounded).max()))


def _assert_close_up_to_bf16_flips(y: np.ndarray, ref: np.ndarray, rounding_effect: float) -> None:
    """float32 agreement (2e-5: sums of ~10^2 products of O(1) values in
    another order) except where the bfloat16 rounding of slot inputs or
    expert outputs flipped: a last-bit difference of the float32 kernels
    before a rounding can put a value on the other side of a rounding
    boundary, one bf16 ulp away, a change at most twice that value's own
    rounding error. So each element stays within 2e-5 + 2 x the largest
    effect of all the rounding (measured on the same input with the rounding
    off), and flips are rare: at most 5% of the elements beyond 2e-5."""
    diff = np.abs(y - ref)
    assert diff.max() <= 2e-5 + 2 * rounding_effect, (diff.max(), rounding_effect)
    assert (diff > 2e-5).mean() <= 0.05, f"{(diff > 2e-5).sum()} of {diff.size} elements beyond 2e-5"


def test_soft_slot_rule_round_and_explicit():
    # g: p = round(16 * 1.125 / 4) = round(4.5) = 4 (ceil would give 5); h: explicit num_slots=2.
    assert _load(SOFT_CASES[0])[1].blocks[2].mlp.router.num_slots == 4
    assert _load(SOFT_CASES[1])[1].blocks[1].mlp.router.num_slots == 2


def test_e3_dispatch_plan_and_ensemble_eval():
    d, model, images = _load(E3_CASE)
    assert model.ensemble_size == 2
    inter = npz(d / "intermediates.npz")
    seen = _capture(model)
    with torch.no_grad():
        logits = model(images, members=True)
    assert logits.shape == (4, 10)
    for name, layer in model.moe_layers().items():
        prefix = f"Encoder/{name}/Moe"
        x, y = seen[name]
        tokens = x.view(-1, 2, x.shape[1], x.shape[2]).transpose(1, 2).reshape(-1, layer.group_size, layer.dim)
        with torch.no_grad():
            gates, _ = layer.router.gates(tokens)
        # Block-diagonal gates: a token of member m has zero gates outside m's experts.
        member = torch.arange(layer.group_size) % 2
        owner = torch.arange(layer.num_experts) // 2
        off = member.view(1, -1, 1) != owner.view(1, 1, -1)
        assert (gates[off.expand_as(gates)] == 0).all()
        r = layer.routing
        plan = top_experts_per_item(gates, r.num_selected_experts, layer.capacity_for(layer.group_size),
                                    r.batch_priority)
        key = next(k for k in inter if k.startswith(f"{prefix}/Router/__call__/0/0/")
                   and k.endswith("dispatch_weights"))
        np.testing.assert_array_equal(routing_to_dense(plan, gates).numpy() > 0, inter[key])
        np.testing.assert_allclose(y.numpy(), inter[f"{prefix}/__call__/1/0"], atol=2e-5)
    ref = npz(d / "ensemble_eval.npz")
    ours = ensemble_log_probs(logits, 2)
    np.testing.assert_allclose(ours.numpy(), ref["log_mean_softmax"], atol=2e-5)
    np.testing.assert_array_equal(ours.argmax(-1).numpy(), ref["label_pred"])


@pytest.mark.parametrize("case", SOFT_CASES + [E3_CASE])
def test_native_round_trip(case, tmp_path):
    d, model, images = _load(case)
    kwargs = model_to_reference(model, str(tmp_path / "ckpt"), num_shards=2)
    again = model_from_reference(str(tmp_path / "ckpt"), kwargs)
    with torch.no_grad():
        torch.testing.assert_close(again(images), model(images), rtol=0, atol=0)
    assert again.config == model.config


def test_e3_with_one_member_is_the_plain_vmoe_on_reference_data():
    """An E^3 model of ensemble size 1 (VisionTransformerMoeEnsemble, M=1),
    loaded from case b's checkpoint, reproduces the plain reference model:
    eval logits, and training-mode logits with the reference's noise draws."""
    d = MODELS / "b_token_repr_e4_k2_bpr_drop"
    kwargs = load_reference_config(str(d / "config.json"))
    e3_kwargs = dict(kwargs, name="VisionTransformerMoeEnsemble")
    e3_kwargs["encoder"] = dict(kwargs["encoder"], moe=dict(kwargs["encoder"]["moe"], ensemble_size=1))
    e3 = model_from_reference(str(d / "ckpt"), e3_kwargs)
    plain = model_from_reference(str(d / "ckpt"), kwargs)
    assert e3.config.moe.ensemble_size == 1
    images = torch.from_numpy(np.load(d / "images.npy")).permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.testing.assert_close(e3(images), plain(images), rtol=0, atol=0)
        np.testing.assert_allclose(e3(images).numpy(), np.load(d / "logits.npy"), atol=1e-5)
        tm = npz(d / "train_mode.npz")
        noise = {k.split("/")[1]: torch.from_numpy(v) for k, v in tm.items() if k.startswith("std_normal_draw/")}
        e3.train()
        np.testing.assert_allclose(e3(images, router_noise=noise).numpy(), tm["logits"], atol=1e-5)
