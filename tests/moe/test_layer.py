"""MoeMlp: dispatch paths agree, dense equivalence, gradients, groups, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vmoe_torch import MoeMlp
from vmoe_torch.moe import (
    Bfloat16Dispatcher,
    EinsumDispatcher,
    IndexDispatcher,
    routing_to_dense,
    split_into_groups,
    top_experts_per_item,
)
from vmoe_torch.moe.dispatch import round_to_bfloat16


def _layer(**kw):
    base = dict(dim=16, mlp_dim=32, num_experts=4, num_selected_experts=2, capacity_factor=0.5,
                group_size=24)
    base.update(kw)
    return MoeMlp(**base)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_index_dispatch_equals_einsum_reference(k, bpr, bf16):
    torch.manual_seed(k)
    G, S, E, D = 3, 20, 5, 8
    gates = torch.softmax(torch.randn(G, S, E) * 2, -1).requires_grad_()
    x = torch.randn(G, S, D, requires_grad=True)
    w = torch.randn(E, D, D)
    routing = top_experts_per_item(gates, k, 4, bpr)
    fast, slow = IndexDispatcher(routing), EinsumDispatcher(routing_to_dense(routing, gates))
    if bf16:
        fast, slow = Bfloat16Dispatcher(fast), Bfloat16Dispatcher(slow)
    buf_fast, buf_slow = fast.dispatch(x), slow.dispatch(x)
    torch.testing.assert_close(buf_fast, buf_slow, rtol=0, atol=0)
    y_fast = fast.combine(torch.bmm(buf_fast, w))
    y_slow = slow.combine(torch.bmm(buf_slow, w))
    torch.testing.assert_close(y_fast, y_slow, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(y_fast.square().sum(), (x, gates), retain_graph=True)
    g2 = torch.autograd.grad(y_slow.square().sum(), (x, gates))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_e1_k1_no_drop_equals_dense_mlp():
    layer = _layer(num_experts=1, num_selected_experts=1, capacity_factor=1.0).eval()
    x = torch.randn(3, 8, 16)
    y, _ = layer(x)
    e = layer.experts
    dense = F.linear(F.gelu(F.linear(x, e.w1[0].T, e.b1[0]), approximate="tanh"), e.w2[0].T, e.b2[0])
    torch.testing.assert_close(y, dense, rtol=1e-5, atol=1e-6)  # gate of the only expert is 1


def test_gradients_reach_router_and_experts():
    layer = _layer().train()
    y, metrics = layer(torch.randn(4, 12, 16))
    (y.square().mean() + metrics["auxiliary_loss"]).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Through combine weights alone (aux losses off):
    layer.zero_grad()
    layer.set_routing(importance_loss_weight=0.0, load_loss_weight=0.0)
    y, metrics = layer(torch.randn(4, 12, 16))
    assert float(metrics["auxiliary_loss"]) == 0.0
    y.square().mean().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_aux_loss_gradient_reaches_router():
    layer = _layer().train()
    _, metrics = layer(torch.randn(4, 12, 16))
    metrics["auxiliary_loss"].backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w1.grad is None


def test_dropped_tokens_contribute_zero():
    layer = _layer(num_selected_experts=1, capacity=1, capacity_factor=None, group_size=24).eval()
    x = torch.randn(2, 12, 16)
    y, metrics = layer(x)
    routing_zero = (y.reshape(-1, 16).abs().sum(-1) == 0).float().mean()
    torch.testing.assert_close(routing_zero, metrics["no_expert_fraction"].mean())
    assert float(metrics["no_expert_fraction"].mean()) > 0.5


def test_groups_span_images_and_remainder_rule():
    assert split_into_groups(100, 32) == [(0, 3, 32), (96, 1, 4)]
    assert split_into_groups(64, 32) == [(0, 2, 32)]
    assert split_into_groups(10, 32) == [(0, 1, 10)]
    assert split_into_groups(10, None) == [(0, 1, 10)]
    layer = _layer(group_size=10).eval()
    x = torch.randn(3, 7, 16)                       # 21 tokens: groups of 10, 10, 1
    y, metrics = layer(x)
    assert metrics["importance_loss"].shape == (3,)
    # The remainder group is routed exactly as a standalone call on its tokens.
    y_last, _ = layer(x.reshape(-1, 16)[20:].reshape(1, 1, 16))
    torch.testing.assert_close(y.reshape(-1, 16)[20:], y_last.reshape(-1, 16))
    y_first, _ = layer(x.reshape(-1, 16)[:10].reshape(1, 10, 16))
    torch.testing.assert_close(y.reshape(-1, 16)[:10], y_first.reshape(-1, 16))


def test_eval_is_deterministic_and_training_is_noisy():
    layer = _layer()
    x = torch.randn(2, 12, 16)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
    layer.train()
    _, m = layer(x)
    assert "load_loss" in m
    draw = torch.randn(1, 24, 4)
    torch.testing.assert_close(layer(x, noise=draw)[0], layer(x, noise=draw)[0])


def test_bfloat16_dispatch_rounds_inputs_and_outputs():
    x = torch.tensor([1.0 + 2**-9, 1.0 + 2**-7])
    torch.testing.assert_close(round_to_bfloat16(x), torch.tensor([1.0, 1.0 + 2**-7]))
    layer = _layer(capacity_factor=4.0).eval()
    x = torch.randn(2, 12, 16)
    y32, _ = layer(x)
    layer.set_routing(bfloat16_dispatch=True)
    y16, _ = layer(x)
    assert 0 < float((y32 - y16).abs().max().detach()) < 0.05


def test_set_routing_and_validation_errors():
    layer = _layer()
    layer.set_routing(num_selected_experts=1, capacity_factor=0.25, batch_priority=True)
    assert layer.capacity_for(24) == 4  # ceil(24*1*0.25/4)=2 -> multiple of 4
    layer.set_routing(capacity=3)
    assert layer.routing.capacity_factor is None and layer.capacity_for(24) == 3
    with pytest.raises(ValueError, match="num_selected_experts"):
        layer.set_routing(num_selected_experts=5)
    with pytest.raises(ValueError, match="num_selected_experts"):
        layer.set_routing(num_selected_experts=0)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        layer.set_routing(capacity=0)
    with pytest.raises(ValueError, match="Unknown routing setting"):
        layer.set_routing(capacity_fator=1.0)
    with pytest.raises(ValueError, match="group_size"):
        _layer(group_size=0)
    with pytest.raises(ValueError, match="expects"):
        layer(torch.randn(2, 3, 15))


def test_capacity_below_one_is_an_error():
    layer = _layer(capacity_factor=0.01, capacity_multiple_of=None, capacity_ceil_or_round="round")
    with pytest.raises(ValueError, match="must be >= 1"):
        layer(torch.randn(2, 12, 16))


def test_expert_choice_router():
    layer = _layer(router="expert_choice", capacity_factor=1.0).eval()
    y, metrics = layer(torch.randn(2, 12, 16))
    assert y.shape == (2, 12, 16)
    assert float(metrics["auxiliary_loss"]) == 0.0
    assert "ratio_processed_items_by_at_least_1_experts" in metrics
    y.sum().backward()
    assert layer.router.weight.grad is not None


def test_ablate_returns_zero():
    layer = _layer()
    layer.set_routing(ablate=True)
    y, m = layer(torch.randn(2, 12, 16))
    assert float(y.abs().sum()) == 0 and float(m["auxiliary_loss"]) == 0


def test_priority_modes():
    gates = torch.softmax(torch.randn(1, 30, 4), -1)
    a = top_experts_per_item(gates, 2, 4, True, priority="sum")
    b = top_experts_per_item(gates, 2, 4, True, priority="random", generator=torch.Generator().manual_seed(0))
    assert a.kept.sum() == b.kept.sum()
    with pytest.raises(ValueError, match="priority"):
        top_experts_per_item(gates, 2, 4, True, priority="median")
