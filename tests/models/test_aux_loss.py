"""Generic training loops and the MoE auxiliary loss: a warning when it is
dropped, and a criterion wrapper that adds it."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from vmoe_torch import WithAuxiliaryLoss, create_model


def _batch(b=4):
    return torch.rand(b, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (b,))


def test_a_loop_that_drops_the_auxiliary_loss_is_warned_once():
    model = create_model("vmoe_mi4_every2_e8_k2").train()
    model.set_auxiliary_loss_gradient(False)  # attached (the default), nothing is dropped
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.cross_entropy(model(x), y).backward()  # the first step cannot know yet
    with pytest.warns(UserWarning, match="auxiliary loss of the previous training step got no gradient"):
        F.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        F.cross_entropy(model(x), y).backward()


def test_no_warning_when_the_loss_includes_it_or_at_evaluation():
    model = create_model("vmoe_mi4_every2_e8_k2").train()
    x, y = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            (F.cross_entropy(model(x), y) + model.auxiliary_loss).backward()
        with torch.no_grad():
            model(x)
        model.eval()
        model(x)
        dense = create_model("vmoe_dense_mi4").train()
        for _ in range(2):
            F.cross_entropy(dense(x), y).backward()  # no auxiliary loss to lose


@pytest.mark.parametrize("name", ["vmoe_mi4_every2_e8_k2", "vmoe_eee_mi4_every2_e8_k1_m2"])
def test_with_auxiliary_loss_equals_the_explicit_sum(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    x, y = _batch()
    criterion = WithAuxiliaryLoss(torch.nn.CrossEntropyLoss(), model)

    class Wrapped(torch.nn.Module):  # as DDP: the V-MoE is `.module`
        def __init__(self, inner):
            super().__init__()
            self.module = inner
    assert WithAuxiliaryLoss(F.cross_entropy, Wrapped(model)).model is model
    model.set_noise_seed(1)
    loss = criterion(model(x, members=True), y)
    loss.backward()
    router = model.blocks[1].mlp.router.weight
    got = router.grad.clone()
    model.zero_grad()
    model.set_noise_seed(1)
    logits = model(x, members=True)
    m = model.ensemble_size
    explicit = F.cross_entropy(logits, y.repeat_interleave(m)) + model.auxiliary_loss
    explicit.backward()
    torch.testing.assert_close(loss, explicit)
    torch.testing.assert_close(got, router.grad)
    assert list(criterion.parameters()) == []  # the model is not a submodule of the loss
