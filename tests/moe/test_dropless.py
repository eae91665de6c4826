"""The dropless expert backend (`RoutingConfig.dropless`): equal to the
capacity path whenever the capacity path drops nothing (outputs within float
rounding: the expert GEMMs see other row counts, so the GEMM library may
round differently; same routing, same metrics), nothing dropped otherwise, the grouped-matmul and the fallback
loop agree, and it is refused where it does not apply."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_torch import create_model
from vmoe_torch.moe import MoeMlp
from vmoe_torch.moe import experts as experts_module

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)


def _pair(e: int, k: int, group: int, members: int = 1, seed: int = 0) -> tuple[MoeMlp, MoeMlp]:
    """The same layer twice: with a capacity no group can overflow (C = S), and dropless."""
    torch.manual_seed(seed)
    capped = MoeMlp(16, 24, e, group_size=group, num_selected_experts=k, capacity=group,
                    ensemble_size=members, batch_priority=True)
    dropless = MoeMlp(16, 24, e, group_size=group, num_selected_experts=k, capacity=group,
                      ensemble_size=members, dropless=True)
    dropless.load_state_dict(capped.state_dict())
    return capped, dropless


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.data(), st.sampled_from([4, 6, 10]), st.integers(1, 5), st.booleans())
def test_dropless_equals_the_capacity_path_when_nothing_drops(e, data, group, groups, training):
    k = data.draw(st.integers(1, e))
    capped, dropless = _pair(e, k, group)
    x = torch.randn(groups * group + data.draw(st.integers(0, group - 1)), 16)[None].repeat(2, 1, 1)
    for layer in (capped, dropless):
        layer.train(training)
        layer.noise_seed = 11
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, ma = capped(xa)
    yb, mb = dropless(xb)
    assert float(ma["dropped_fraction"].max()) == 0.0 == float(mb["dropped_fraction"].max())
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mb["auxiliary_loss"], ma["auxiliary_loss"], rtol=0, atol=0)
    (ya.square().sum() + ma["auxiliary_loss"]).backward()
    (yb.square().sum() + mb["auxiliary_loss"]).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    # A weight gradient sums up to ~10^2 products per element, in another order
    # and blocking on each path (grouped_mm vs bmm): they differ by up to
    # ~10^2 x 2^-24 of the tensor's largest entry (AVX2, AVX-512 and portable
    # kernels block differently); 2^-16 of it bounds that with margin, far
    # below a misrouted token or a lost gate (order 1).
    for (name, pa), pb in zip(capped.named_parameters(), dropless.parameters()):
        scale = float(pa.grad.abs().max())
        torch.testing.assert_close(pb.grad, pa.grad, rtol=0, atol=2.0 ** -16 * scale + 1e-12, msg=name)


def test_dropless_keeps_every_choice_where_the_capacity_path_drops():
    torch.manual_seed(0)
    layer = MoeMlp(16, 24, 4, group_size=32, num_selected_experts=2, capacity_factor=0.5).eval()
    x = torch.randn(4, 32, 16)
    _, capped = layer(x)
    assert float(capped["dropped_fraction"].mean()) > 0.2
    layer.set_routing(dropless=True)
    y, metrics = layer(x)
    assert float(metrics["dropped_fraction"].max()) == 0.0 and float(metrics["no_expert_fraction"].max()) == 0.0
    # each token's output is the gate-weighted sum of its two experts, computed one token at a time
    plan_gates, plan_experts = torch.softmax(layer.router_logits(x.view(4, 32, 16)), -1).topk(2, dim=-1)
    e = layer.experts
    token = x.view(-1, 16)[5]
    want = sum(g * (torch.nn.functional.gelu(token @ e.w1[i] + e.b1[i], approximate="tanh") @ e.w2[i] + e.b2[i])
               for g, i in zip(plan_gates.view(-1, 2)[5], plan_experts.view(-1, 2)[5]))
    torch.testing.assert_close(y.view(-1, 16)[5], want, rtol=1e-5, atol=1e-6)
    assert int(metrics["capacity"]) == int((metrics["expert_load"] * 64).round().max())


def test_grouped_matmul_and_the_fallback_loop_agree(monkeypatch):
    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    _, layer = _pair(8, 2, 20)
    layer.eval()
    x = torch.randn(6, 20, 16)
    grouped, _ = layer(x)
    monkeypatch.setattr(experts_module, "_grouped_mm_ok", lambda t: False)
    loop, _ = layer(x)
    torch.testing.assert_close(loop, grouped, rtol=1e-6, atol=1e-6)


def test_dropless_ensemble_equals_its_capacity_path():
    capped, dropless = _pair(8, 1, 16, members=2)
    x = torch.randn(4, 16, 16)  # B*M rows
    capped.eval(), dropless.eval()
    torch.testing.assert_close(dropless(x)[0], capped(x)[0], rtol=1e-5, atol=1e-6)


def test_dropless_is_a_routing_setting_of_whole_models(tmp_path):
    model = create_model("vmoe_mi4_every2_e8_k2", num_layers=2, layers=(1,), capacity_factor=0.5).eval()
    model.set_routing(dropless=True)
    assert model.config.moe.routing.dropless
    model.save_pretrained(str(tmp_path / "m"))
    again = type(model).from_pretrained(str(tmp_path / "m"))
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    assert again.config.moe.routing.dropless and torch.equal(again(x), model(x))
    with pytest.raises(ValueError, match="dropless applies to the top_experts router"):
        model.set_routing(router="expert_choice")
    with pytest.raises(ValueError, match="dropless applies"):
        MoeMlp(16, 24, 4, group_size=8, router="expert_choice", dropless=True)


def test_dropless_needs_experts_with_a_grouped_forward():
    _, layer = _pair(4, 2, 8)

    class Remote(torch.nn.Module):  # experts that only take capacity buffers
        def forward(self, buffers):
            return buffers
    layer.experts = Remote()
    with pytest.raises(ValueError, match="Remote has none: route with a capacity"):
        layer(torch.randn(2, 8, 16))


def test_dropless_under_compile_in_float32_names_the_limit():
    import torch._dynamo
    torch._dynamo.reset()
    _, layer = _pair(4, 2, 8)
    compiled = torch.compile(layer, fullgraph=True)
    with pytest.raises(Exception, match="need bfloat16 rows"):
        compiled(torch.randn(2, 8, 16))
