"""A non-finite token (NaN / Inf input) stays in its own image: it takes no
expert slot and cannot leak into other tokens' outputs."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_torch import create_model
from vmoe_torch.moe import top_experts_per_item


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 30), st.integers(1, 6), st.integers(1, 3), st.integers(1, 12), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_nonfinite_token_takes_no_slot(size, experts, k, capacity, bpr, seed):
    k = min(k, experts)
    gen = torch.Generator().manual_seed(seed)
    gates = torch.softmax(torch.randn(1, size, experts, generator=gen), -1)
    bad = int(torch.randint(size, (1,), generator=gen))
    poisoned = gates.clone()
    poisoned[0, bad] = float("nan")
    r = top_experts_per_item(poisoned, k, capacity, bpr)
    keep = [i for i in range(size) if i != bad]
    ref = top_experts_per_item(gates[:, keep], k, capacity, bpr)
    assert not r.kept[0, bad].any()
    assert torch.equal(r.expert_index[:, keep], ref.expert_index)
    assert torch.equal(r.buffer_index[:, keep], ref.buffer_index)


@pytest.mark.parametrize("bpr,cf,k", [(False, 1.05, 2), (True, 0.5, 2), (False, 0.25, 1), (True, 8.0, 2)])
def test_one_nan_image_does_not_poison_its_routing_group(bpr, cf, k):
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every2_e8_k2", num_selected_experts=k).eval()  # groups of 8 images
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would hide any change
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), model.routing(batch_priority=bpr, capacity_factor=cf):
        clean = model(x)
        x[0, 0, 0, 0] = float("nan")
        dirty = model(x)
    assert torch.isnan(dirty[0]).all()
    assert torch.isfinite(dirty[1:]).all()
    if cf >= 4:  # nothing dropped: the other images' outputs do not move at all
        torch.testing.assert_close(dirty[1:], clean[1:], rtol=0, atol=0)


@pytest.mark.parametrize("router", ["ot_sparse_ec", "ot_ksparse_tc", "ot_ksparse_ec", "ot_kl_tc", "ot_kl_ec"])
def test_one_nan_image_does_not_poison_an_optimal_transport_plan(router):
    """The OT plan couples a group's tokens: a non-finite token takes part with
    zero logits (so the plan stays finite), then takes no slot (tokens
    choose) or only slots no finite token wants (experts choose)."""
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every2_e8_k2", router=router, capacity_factor=1.05).eval()
    torch.nn.init.normal_(model.head.weight)
    x = torch.randn(8, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        dirty = model(x)
    assert torch.isnan(dirty[0]).all()
    assert torch.isfinite(dirty[1:]).all()
