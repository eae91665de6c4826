"""`batch_independent_routing()`: an image's prediction does not depend on
the other images of its batch, for every router kind. The as-trained routing
at a low capacity shows the dependence the mode removes.

Tolerance: the same per-image arithmetic in GEMMs of another size (float32
rounding of sums over <= 4*D terms, amplified through a few blocks): 1e-4
on logits of order 1."""
from __future__ import annotations

import pytest
import torch

from vmoe_torch import create_model

pytestmark = pytest.mark.numerics

CASES = {
    "top_experts": ("vmoe_mi4_every2_e8_k2", {"dropless": True}),
    "expert_choice": ("vmoe_mi4_every2_e8_k2", None),
    "soft": ("vmoe_soft_mi4_half", None),
    "e3": ("vmoe_eee_mi4_every2_e8_k1_m2", {"dropless": True}),
}


def _model(name, **kw):
    torch.manual_seed(0)
    model = create_model(name, **kw).eval()
    with torch.no_grad():  # a head that separates the classes (the zero-initialised one gives 0 logits)
        model.head.weight.normal_(std=1.0)
    return model


@pytest.mark.parametrize("kind", sorted(CASES))
def test_each_image_alone_equals_it_in_a_batch(kind):
    name, expected = CASES[kind]
    model = _model(name, router="expert_choice") if kind == "expert_choice" else _model(name)
    if kind == "soft":  # bf16 rounding of slots would turn GEMM-size rounding into 2^-8 steps
        model.set_routing(bfloat16_dispatch=False)
    changes = model.batch_independent_routing()
    if expected is not None:
        assert changes == expected
    else:
        assert changes == {"group_size": model.config.tokens_per_image}
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    with torch.no_grad(), model.routing(**changes):
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert model.routing_settings()["group_size"] == model.config.moe.group_size  # restored


def test_grouped_routing_at_low_capacity_depends_on_the_batch():
    model = _model("vmoe_mi4_every2_e8_k2", capacity_factor=0.5)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    assert (batched - alone).abs().max() > 1e-2


def test_a_dense_model_needs_no_change():
    assert create_model("vmoe_dense_mi4").batch_independent_routing() == {}
