"""moe.gather: the paired gather (forward a gather, backward a gather-and-add
through the inverse map) against torch's own index_select and its
scatter-add backward, in float64 and to the bit where the order of a sum
cannot differ; the custom operators' registration (opcheck); the index
dispatcher built on it, and a compiled layer without atomic adds."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_torch import MoeMlp
from vmoe_torch.moe import IndexDispatcher, top_experts_per_item
from vmoe_torch.moe.gather import gather_sum, padded_gather, paired_gather


def _maps(n: int, m: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random partial injection of n sources x r copies into m rows:
    index (m,) in [0, n] and its inverse (n, r) in [0, m]."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(m + n * r, generator=g)[: n * r]       # some copies land past m: dropped
    inverse = torch.where(rows < m, rows, m).view(n, r)
    index = torch.full((m + 1,), n, dtype=torch.long)
    index.scatter_(0, inverse.reshape(-1), torch.arange(n).repeat_interleave(r))
    return index[:m], inverse


def _reference(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The same gather through torch's own autograd (index_select, whose
    backward scatter-adds): `padded_gather` called directly."""
    return padded_gather(src, index)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 12), m=st.integers(1, 30), r=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_paired_gather_matches_index_select_forward_and_backward(n, m, r, seed):
    index, inverse = _maps(n, m, r, seed)
    src = torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(m, 5, dtype=torch.float64)
    got = paired_gather(src, index, inverse)
    want = _reference(src, index)
    assert torch.equal(got, want)
    (g_got,) = torch.autograd.grad(got, src, grad)
    (g_want,) = torch.autograd.grad(want, src, grad)
    # Float64, at most 3 terms per row: the two orders of summation agree to
    # a few ulps of the largest term.
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=8 * torch.finfo(torch.float64).eps * grad.abs().max())
    if r <= 2:  # two terms added to zero: the same sum in either order
        assert torch.equal(g_got, g_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bit_identical_to_scatter_for_k_up_to_2(dtype):
    index, inverse = _maps(40, 90, 2, seed=3)
    src = torch.randn(40, 64).to(dtype).requires_grad_()
    grad = torch.randn(90, 64).to(dtype)
    (g_got,) = torch.autograd.grad(paired_gather(src, index, inverse), src, grad)
    (g_want,) = torch.autograd.grad(_reference(src, index), src, grad)
    assert torch.equal(g_got, g_want)


def test_gather_sum_adds_the_listed_rows_and_nothing_for_index_n():
    src = torch.tensor([[2.0, 3.0], [4.0, 5.0], [-1.0, 0.5]], dtype=torch.float64)
    index = torch.tensor([[0, 1], [0, 3], [3, 3], [2, 2]])                 # 3 = N: adds nothing
    want = torch.tensor([[6.0, 8.0], [2.0, 3.0], [0.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    assert torch.equal(gather_sum(src, index), want)
    assert torch.equal(gather_sum(src.float(), index), want.float())
    # bfloat16 takes the gather-and-sum path: one round to nearest even.
    b = torch.randn(50, 16).bfloat16()
    idx = torch.randint(0, 51, (30, 2))
    exact = padded_gather(b.float(), idx).sum(1)
    assert torch.equal(gather_sum(b, idx), exact.bfloat16())


def test_plain_gather_without_gradients_and_under_export():
    """The custom operator only where a backward can run: not under no_grad,
    and not in torch.export's graphs (ONNX keeps to ATen operators)."""
    index, inverse = _maps(6, 10, 2, seed=1)
    src = torch.randn(6, 4, requires_grad=True)
    assert "vmoe_torch_paired_gather" in paired_gather(src, index, inverse).grad_fn.name()
    with torch.no_grad():
        out = paired_gather(src, index, inverse)
    assert out.grad_fn is None and torch.equal(out, padded_gather(src.detach(), index))

    class Gather(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rows = torch.nn.Parameter(torch.randn(6, 4))

        def forward(self, scale: torch.Tensor) -> torch.Tensor:
            return paired_gather(self.rows * scale, index, inverse)

    graph = str(torch.export.export(Gather(), (torch.ones(1),)).graph)
    assert "index_select" in graph and "vmoe_torch" not in graph


def test_custom_operators_pass_opcheck():
    if not hasattr(torch.library, "opcheck"):
        pytest.skip("torch.library.opcheck needs torch >= 2.4")
    index, inverse = _maps(7, 12, 2, seed=5)
    src = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.vmoe_torch.paired_gather.default, (src, index, inverse))
    torch.library.opcheck(torch.ops.vmoe_torch.gather_sum.default, (torch.randn(12, 3), inverse))
    assert torch.autograd.gradcheck(lambda s: paired_gather(s, index, inverse), (src,))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatcher_maps_are_inverse_of_each_other(k):
    torch.manual_seed(k)
    G, S, E = 3, 20, 5
    plan = top_experts_per_item(torch.softmax(torch.randn(G, S, E) * 2, -1), k, 4, True)
    d = IndexDispatcher(plan)
    slots, tokens = d.slot_choice.shape[0], G * S
    kept = d.token_slot < slots                                     # (G*S, K)
    assert torch.equal(kept, plan.kept.reshape(tokens, k))
    flat = d.token_slot.reshape(-1)
    choice = torch.arange(tokens * k).view(tokens, k)
    assert torch.equal(d.slot_choice[flat[kept.reshape(-1)], 0], choice[kept])     # slot -> its choice
    empty = d.slot_choice[:, 0] == tokens * k
    assert int((~empty).sum()) == int(kept.sum())
    assert torch.equal(d.slot_token[empty], torch.full_like(d.slot_token[empty], tokens))
    assert torch.equal(d.slot_token[~empty], d.slot_choice[~empty, 0] // k)


def test_combine_keeps_a_nan_in_one_slot_out_of_dropped_choices():
    torch.manual_seed(0)
    plan = top_experts_per_item(torch.softmax(torch.randn(2, 12, 4) * 3, -1), 2, 2, True)
    assert not bool(plan.kept.all())
    d = IndexDispatcher(plan)
    y = torch.randn(4, 2 * 2, 3)
    y.view(-1, 3)[0] = float("nan")
    out = d.combine(y).reshape(-1, 3)
    reads_slot0 = (d.token_slot == 0).any(1)
    assert torch.isnan(out[reads_slot0]).all()
    assert torch.isfinite(out[~reads_slot0]).all()


@pytest.mark.slow
def test_compiled_layer_backward_has_no_atomic_adds():
    """Inductor lowers a scatter-add (torch's backward of index_select) to
    atomic adds; the dispatcher's paired gathers leave none."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MoeMlp(16, 32, 4, group_size=8, num_selected_experts=2, capacity_factor=1.0).train()
    layer.noise_seed = 0
    x = torch.randn(6, 8, 16, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)

    def step():
        y, metrics = compiled(x)
        (y.square().mean() + metrics["auxiliary_loss"]).backward()

    _, code = run_and_get_code(step)
    text = "\n".join(code)
    assert "vmoe_torch.paired_gather" in text and "vmoe_torch.gather_sum" in text
    assert "atomic_add" not in text
    eager_x = x.detach().clone().requires_grad_()
    y, metrics = layer(eager_x)
    (y.square().mean() + metrics["auxiliary_loss"]).backward()
    torch.testing.assert_close(x.grad, eager_x.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropless", [False, True])
def test_layer_gradients_are_those_of_plain_gathers_to_the_bit(dropless, monkeypatch):
    """K=2: the layer's gradients with paired gathers equal those with torch's
    index_select (scatter-add backward), capacity and dropless dispatch."""
    from vmoe_torch.moe import dispatch as dispatch_module

    def grads():
        torch.manual_seed(0)
        layer = MoeMlp(16, 32, 4, group_size=24, num_selected_experts=2, capacity_factor=0.75,
                       dropless=dropless).train()
        layer.noise_seed = 1
        x = torch.randn(4, 12, 16, requires_grad=True)
        y, metrics = layer(x)
        (y.square().mean() + metrics["auxiliary_loss"]).backward()
        return [x.grad] + [p.grad for p in layer.parameters()]

    paired = grads()
    monkeypatch.setattr(dispatch_module, "paired_gather", lambda src, index, inverse: padded_gather(src, index))
    plain = grads()
    assert all(torch.equal(a, b) for a, b in zip(paired, plain))
    assert paired[0].abs().sum() > 0


def test_second_order_gradients_go_through():
    """Gradient penalties and Hessian products differentiate the backward."""
    index, inverse = _maps(6, 14, 2, seed=7)
    src = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda s: paired_gather(s, index, inverse), (src,))
    torch.manual_seed(0)
    layer = MoeMlp(8, 16, 4, group_size=12, num_selected_experts=2, capacity_factor=0.75).double().train()
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert layer.experts.w1.grad.abs().sum() > 0
