"""E^3 efficient ensembles: members equal separate models, averaging, M=1
equals the plain V-MoE, training and config errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vmoe_torch import VisionTransformerMoe, create_model
from vmoe_torch.models import ensemble_log_probs, extract_member

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)


def _e3(ensemble_size=2, experts=4, k=2, bpr=True, cf=0.75, images_per_group=2, **kw):
    torch.manual_seed(0)
    tokens = 17  # 16x16 images, patch 4, class token
    return create_model("V-MoE-Mi/4, E=4, K=2, Every 2", num_classes=5, image_size=16,
                        num_experts=experts, num_selected_experts=k, batch_priority=bpr,
                        capacity_factor=cf, ensemble_size=ensemble_size,
                        group_size=images_per_group * tokens * ensemble_size, **kw).eval()


@pytest.mark.parametrize("bpr,cf", [(True, 0.75), (False, 0.5), (True, 2.0)])
def test_members_equal_separate_models_and_average(bpr, cf):
    model = _e3(bpr=bpr, cf=cf)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        logits = model(x, members=True)
        members = [extract_member(model, m)(x) for m in range(2)]
    assert logits.shape == (12, 5)
    for m in range(2):
        torch.testing.assert_close(logits[m::2], members[m], rtol=1e-5, atol=1e-5)
    mean_p = torch.stack([torch.softmax(t, -1) for t in members]).mean(0)
    torch.testing.assert_close(ensemble_log_probs(logits, 2).exp(), mean_p, rtol=1e-5, atol=1e-6)


def test_ensemble_size_one_equals_plain_vmoe():
    plain = _e3(ensemble_size=1).train()
    cfg = plain.config
    assert cfg.moe.ensemble_size == 1
    twin = VisionTransformerMoe(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe))).train()
    twin.load_state_dict(plain.state_dict())
    x = torch.randn(4, 3, 16, 16)
    plain.set_noise_seed(3), twin.set_noise_seed(3)
    a, ma = plain(x, return_metrics=True)
    b, mb = twin(x, return_metrics=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ma.keys() == mb.keys()
    for key in ma:
        torch.testing.assert_close(ma[key], mb[key], rtol=0, atol=0)
    assert ma["encoderblock_1/importance_loss"].dim() == 1  # (G,), no member axis at M=1


def test_training_step_metrics_and_noise_per_member():
    model = _e3().train()
    x = torch.randn(4, 3, 16, 16)
    model.set_noise_seed(1)
    logits, metrics = model(x, return_metrics=True, members=True)
    assert metrics["encoderblock_1/load_loss"].shape == (2, 2)  # (G, M): 4*17*2 tokens / 68
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4).repeat_interleave(2) % 5)
    (loss + metrics["auxiliary_loss"]).backward()
    assert model.blocks[1].mlp.router.weight.grad.abs().sum() > 0
    # Injected noise has one (S, E/M) draw per group: member m's tokens read their own columns.
    layer = model.blocks[1].mlp
    assert layer.router.noise_shape(2, layer.group_size) == (2, layer.group_size, 2)


def test_config_errors():
    with pytest.raises(ValueError, match="divide num_experts"):
        _e3(ensemble_size=3)
    with pytest.raises(ValueError, match="experts of each"):
        _e3(k=3)
    with pytest.raises(ValueError, match="multiple of ensemble_size"):
        create_model("V-MoE-Mi/4, E=4, K=1, Every 2", ensemble_size=2, group_size=33)
    from vmoe_torch.moe import MoeMlp
    with pytest.raises(ValueError, match="multiple of ensemble_size"):  # the layer applies the same rule
        MoeMlp(8, 16, 4, group_size=33, ensemble_size=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        MoeMlp(8, 16, 4, group_size=True)
    with pytest.raises(ValueError, match="top_experts"):
        create_model("V-MoE-Mi/4, E=4, K=1, Every 2", ensemble_size=2, router="expert_choice")
    with pytest.raises(ValueError, match="needs an E\\^3 model"):
        extract_member(_e3(ensemble_size=1), 0)
