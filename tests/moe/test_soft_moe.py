"""Soft MoE: weight invariants, equivariance, no dropping and independence
from the other groups (hypothesis), plus layer behaviour and errors."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_torch import MoeMlp
from vmoe_torch.moe import RoutingConfig, SoftDispatcher, soft_num_slots
from vmoe_torch.moe.soft import l2_normalize, soft_router_logits, soft_weights

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)

COMMON = settings(max_examples=60, deadline=None)


def _soft_layer(dim=8, experts=3, group_size=6, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoeMlp(dim, 16, experts, RoutingConfig(router="soft", capacity_factor=1.0, **kw),
                   group_size=group_size).eval()
    with torch.no_grad():
        layer.router.scale.fill_(3.0)
    return layer


@st.composite
def soft_case(draw):
    groups, size = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    experts, slots, dim = draw(st.integers(1, 5)), draw(st.integers(1, 3)), draw(st.integers(2, 9))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(groups, size, dim, generator=gen, dtype=torch.float64)
    mu = torch.randn(dim, experts, slots, generator=gen, dtype=torch.float64)
    scale = torch.tensor(draw(st.floats(0.1, 20.0)), dtype=torch.float64)
    return x, mu, scale


@COMMON
@given(soft_case())
def test_dispatch_sums_to_one_over_tokens_combine_over_slots(case):
    x, mu, scale = case
    dispatch, combine = soft_weights(soft_router_logits(x, mu, scale)[0])
    torch.testing.assert_close(dispatch.sum(1), torch.ones_like(dispatch.sum(1)))
    torch.testing.assert_close(combine.sum((2, 3)), torch.ones_like(combine.sum((2, 3))))
    # Nothing is dropped: every token feeds every slot and reads every slot (softmax > 0).
    assert (dispatch > 0).all() and (combine > 0).all()


@COMMON
@given(soft_case(), st.integers(0, 2**31 - 1))
def test_permutation_equivariance_over_tokens(case, seed):
    x, mu, scale = case
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))
    disp = SoftDispatcher(*soft_weights(soft_router_logits(x, mu, scale)[0]))
    disp_p = SoftDispatcher(*soft_weights(soft_router_logits(x[:, perm], mu, scale)[0]))
    w = torch.randn(mu.shape[1], x.shape[-1], x.shape[-1], dtype=x.dtype)
    y = disp.combine(torch.tanh(torch.bmm(disp.dispatch(x), w)))
    y_p = disp_p.combine(torch.tanh(torch.bmm(disp_p.dispatch(x[:, perm]), w)))
    # Slots are permutation-invariant mixes, so the outputs permute with the tokens.
    torch.testing.assert_close(y_p, y[:, perm], rtol=1e-9, atol=1e-9)


@COMMON
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_output_independent_of_the_other_groups(n_a, n_b, seed):
    """Groups of one image each: an image's output does not depend on which
    images share its batch (float64, so that only matmul blocking differs,
    ~1e-16, far from any bfloat16 rounding boundary; a leak would be O(0.1))."""
    gen = torch.Generator().manual_seed(seed)
    layer = _soft_layer(group_size=6).double()
    img = torch.randn(1, 6, 8, generator=gen, dtype=torch.float64)
    other = lambda n: torch.randn(n, 6, 8, generator=gen, dtype=torch.float64)  # noqa: E731
    with torch.no_grad():
        alone, _ = layer(img)
        a, _ = layer(torch.cat([other(n_a), img]))
        b, _ = layer(torch.cat([img, other(n_b)]))
    torch.testing.assert_close(a[-1:], alone, rtol=0, atol=1e-12)
    torch.testing.assert_close(b[:1], alone, rtol=0, atol=1e-12)


def test_normalisation_adds_eps_to_the_squared_norm():
    v = torch.tensor([[1e-3, 0.0]])
    # rsqrt(1e-6 + 1e-6) * 1e-3 = 0.7071..., not 1 as with v / max(|v|, eps).
    torch.testing.assert_close(l2_normalize(v, -1)[0, 0], torch.tensor(2 ** -0.5))


def test_slot_rule():
    assert soft_num_slots(16, 4, 1.125) == 4            # round(4.5) = 4 (halves to even)
    assert soft_num_slots(16, 4, 1.375) == 6            # round(5.5) = 6
    assert soft_num_slots(16, 4, 1.0, num_slots=2) == 2  # explicit wins
    with pytest.raises(ValueError, match="capacity"):
        soft_num_slots(4, 16, 0.1)


def test_layer_forward_backward_metrics_and_bf16_switch():
    layer = _soft_layer().train()
    x = torch.randn(4, 6, 8, requires_grad=True)
    y, metrics = layer(x)
    assert y.shape == x.shape and float(metrics["auxiliary_loss"]) == 0.0
    assert int(metrics["capacity"]) == soft_num_slots(6, 3, 1.0)
    for key in ("combine_weights_min_mean", "dispatch_weights_max_mean", "mu_similarity_mean"):
        assert metrics[key].dim() == 0
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert layer.routing.effective_bfloat16  # the reference always rounds around the experts
    layer.eval()
    with torch.no_grad():
        y16, _ = layer(x)
        layer.set_routing(bfloat16_dispatch=False)
        y32, _ = layer(x)
    assert 0 < (y16 - y32).abs().max() < 1e-2


def test_training_noise_is_injectable_and_changes_the_output():
    layer = _soft_layer(noise_std=0.5).train()
    x = torch.randn(2, 6, 8)
    shape = layer.router.noise_shape(2, 6)
    assert shape == (2, 6, 3, layer.router.num_slots)
    noise = torch.randn(shape)
    with torch.no_grad():
        a, _ = layer(x, noise=noise)
        b, _ = layer(x, noise=noise)
        c, _ = layer(x, noise=torch.zeros(shape))
        layer.eval()
        d, _ = layer(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-4


def test_soft_config_errors_and_fixed_slots():
    with pytest.raises(ValueError, match="num_slots"):
        RoutingConfig(router="soft", capacity=4, capacity_factor=None).validate(4)
    with pytest.raises(ValueError, match="Batch Priority"):
        RoutingConfig(router="soft", batch_priority=True).validate(4)
    with pytest.raises(ValueError, match="slot count at construction"):
        MoeMlp(8, 16, 4, RoutingConfig(router="soft"))
    layer = _soft_layer()
    with pytest.raises(ValueError, match="fixed by its parameters"):
        layer.set_routing(num_slots=layer.router.num_slots + 1)
    with pytest.raises(ValueError, match="Cannot switch"):
        layer.set_routing(router="top_experts", capacity_factor=1.0)
    layer.set_routing(num_slots=layer.router.num_slots)  # same p: allowed
    with pytest.raises(ValueError, match="sparse routers"):
        layer.router_logits(torch.randn(1, 6, 8))


def test_bf16_autocast_keeps_the_soft_router_in_fp32():
    layer = _soft_layer().train()
    x = torch.randn(2, 6, 8)
    seen = {}
    orig = layer.router.forward

    def spy(*args, **kw):
        dispatcher, metrics = orig(*args, **kw)
        seen["dtype"] = dispatcher.inner.dispatch_weights.dtype
        return dispatcher, metrics
    layer.router.forward = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert seen["dtype"] == torch.float32 and y.dtype == x.dtype
    y.float().square().sum().backward()
    assert layer.router.mu.grad is not None and torch.isfinite(layer.router.mu.grad).all()
