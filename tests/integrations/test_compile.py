"""torch.compile(dynamic=True, fullgraph=True) on a MoE model at inference:
equal to eager, and one graph for every batch that is a whole number of
routing groups (no recompilation per batch size)."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

from vmoe_torch import create_model

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("routing", [{}, {"capacity_factor": 0.5, "batch_priority": True}],
                         ids=["full_capacity", "C0.5_bpr"])
def test_compiled_moe_model_equals_eager_without_recompiling(routing):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("vmoe_mi4_every2_e8_k2", num_layers=2, layers=(1,), **routing).eval()  # 8-image groups
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    for batch in (16, 24):
        x = torch.rand(batch, 3, 32, 32) * 2 - 1
        got = compiled(x)
        metrics = dict(model.metrics)  # left by the compiled forward
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        for key in ("auxiliary_loss", "encoderblock_1/dropped_fraction"):
            torch.testing.assert_close(metrics[key], model.metrics[key], rtol=1e-5, atol=1e-6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (32, 40):
            x = torch.rand(batch, 3, 32, 32) * 2 - 1
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
