"""Contrastive image-text models: the loss and the logit scale as the
reference writes them (`projects/contrastive`: `TwoTower` and the trainer's
`sigmoid_loss`), written out here in float64 on fixed embeddings; the two
towers and LIMoE's shared backbone; the entropy losses."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from vmoe_torch.config.catalogue import resolve_config
from vmoe_torch.config.contrastive import ContrastiveConfig, TextConfig
from vmoe_torch.config.model import MoeConfig
from vmoe_torch.config.routing import RoutingConfig
from vmoe_torch.models.contrastive import ContrastiveModel, sigmoid_loss, zero_shot_accuracy, zero_shot_classifier
from vmoe_torch.moe.routing import global_entropy_loss, local_entropy_loss


def _reference_logits_and_loss(zimg, ztxt, scale_init, bias_init):
    """The reference's formulas, in numpy float64: normalise each embedding
    by (norm + 1e-8), logits = zimg @ ztxt.T * exp(log(scale_init)) (+ b);
    loss_i = -sum_j log_sigmoid(z_ij * logits_ij), z = 2 I - 1."""
    zimg = zimg / (np.linalg.norm(zimg, axis=-1, keepdims=True) + 1e-8)
    ztxt = ztxt / (np.linalg.norm(ztxt, axis=-1, keepdims=True) + 1e-8)
    logits = np.einsum("md,nd->mn", zimg, ztxt) * np.exp(np.log(scale_init))
    if bias_init is not None:
        logits = logits + bias_init
    z = 2.0 * np.eye(len(logits)) - 1.0
    log_sigmoid = -np.logaddexp(0.0, -(logits * z))
    return logits, -log_sigmoid.sum(-1)


def _model(shared=False, **kw):
    image = resolve_config("vmoe_mi4_every2_e8_k2", num_classes=10)
    text = TextConfig(vocab_size=20, max_len=6, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
    if shared:
        text = dataclasses.replace(text, hidden_size=image.hidden_size)
    torch.manual_seed(0)
    return ContrastiveModel(ContrastiveConfig(image=image, text=text, embed_dim=16, shared=shared, **kw))


@pytest.mark.parametrize("scale_init, bias_init", [(1.0, None), (10.0, -10.0)])
def test_logits_and_loss_match_the_reference_formulas(scale_init, bias_init):
    model = _model(scale_init=scale_init, bias_init=bias_init).eval()
    images, texts = torch.randn(5, 3, 32, 32), torch.randint(0, 20, (5, 6))
    with torch.no_grad():
        zimg_raw = model.image(images).double().numpy()
        ztxt_raw = model.text_head(model.text(texts)).double().numpy()
        logits = model(images, texts)
    want_logits, want_loss = _reference_logits_and_loss(zimg_raw, ztxt_raw, scale_init, bias_init)
    np.testing.assert_allclose(logits.double().numpy(), want_logits, rtol=1e-5, atol=1e-5 * scale_init)
    np.testing.assert_allclose(sigmoid_loss(logits.double()).numpy(),
                               _reference_logits_and_loss(zimg_raw, ztxt_raw, scale_init, bias_init)[1],
                               rtol=1e-4)
    assert float(model.log_scale.detach()) == pytest.approx(math.log(scale_init))


def test_sigmoid_loss_on_fixed_logits():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], dtype=torch.float64)
    want = [-(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 / (1 + math.exp(-1.0)))),
            -(math.log(1 / (1 + math.exp(0.5))) + math.log(1 / (1 + math.exp(-3.0))))]
    torch.testing.assert_close(sigmoid_loss(logits), torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be equal"):
        sigmoid_loss(torch.zeros(2, 3))


@pytest.mark.parametrize("shared", [False, True])
def test_a_training_step_reaches_both_towers_and_the_scale(shared):
    model = _model(shared=shared, scale_init=10.0, bias_init=-10.0).train()
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(0, 20, (4, 6))
    loss = sigmoid_loss(model(images, texts)).mean() + model.auxiliary_loss
    loss.backward()
    assert set(model.metrics) == {"img", "txt"}
    text_params = model.text_embed.weight if shared else model.text.embed.weight
    for p in (model.image.patch_embed.proj.weight, text_params, model.log_scale, model.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    router = next(iter(model.image.moe_layers().values())).router
    assert router.weight.grad.abs().sum() > 0
    if shared:  # the text went through the image tower's MoE layers: their metrics are the text's
        assert any(k.endswith("/importance_loss") for k in model.metrics["txt"])


def test_zero_shot_assigns_images_to_their_class_captions():
    """With the text tower replaced by a lookup that embeds class c's
    captions where images of class c embed, zero-shot accuracy is 1; with
    shuffled captions it falls to the share of classes that match by chance."""
    model = _model().eval()
    images, labels = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    with torch.no_grad():
        zimg = model(images=images)
    centroid = torch.stack([zimg[labels == c].mean(0) for c in range(3)])

    class Lookup(torch.nn.Module):
        metrics: dict = {}

        def forward(self, tokens):
            return centroid[tokens[:, 0]]
    model.text, model.text_head = Lookup(), torch.nn.Identity()
    captions = [torch.full((2, 6), c) for c in range(3)]
    classifier = zero_shot_classifier(model, captions)
    assert classifier.shape == (3, 16)
    assert zero_shot_accuracy(model, classifier, [(images, labels)]) == 1.0
    shuffled = zero_shot_classifier(model, [captions[1], captions[2], captions[0]])
    assert zero_shot_accuracy(model, shuffled, [(images, labels)]) == 0.0


def test_entropy_losses():
    """LIMoE's local entropy (mean per-token entropy) and global entropy loss
    (minus the entropy of the mean gates), against float64 numpy."""
    gates = torch.softmax(torch.randn(2, 7, 4, dtype=torch.float64), -1)
    g = gates.numpy()
    want_local = -(g * np.log(g)).sum(-1).mean(-1)
    mean = g.mean(1)
    want_global = (mean * np.log(mean)).sum(-1)
    np.testing.assert_allclose(local_entropy_loss(gates).numpy(), want_local, rtol=1e-12)
    np.testing.assert_allclose(global_entropy_loss(gates).numpy(), want_global, rtol=1e-12)
    uniform = torch.full((1, 3, 4), 0.25, dtype=torch.float64)
    assert float(local_entropy_loss(uniform)) == pytest.approx(math.log(4))
    assert float(global_entropy_loss(uniform)) == pytest.approx(-math.log(4))


def test_the_entropy_losses_enter_the_auxiliary_loss_when_weighted():
    routing = RoutingConfig(num_selected_experts=2, importance_loss_weight=0.0, load_loss_weight=0.0,
                            local_entropy_loss_weight=0.1, global_entropy_loss_weight=0.2)
    cfg = resolve_config("vmoe_mi4_every2_e8_k2", num_classes=10)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, routing=routing))
    from vmoe_torch import VisionTransformerMoe
    model = VisionTransformerMoe(cfg).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    name = next(iter(model.moe_layers()))
    m = model.metrics
    want = 0.1 * m[f"{name}/local_entropy_loss"] + 0.2 * m[f"{name}/global_entropy_loss"]
    torch.testing.assert_close(m[f"{name}/auxiliary_loss"], want)
    with pytest.raises(ValueError, match="LIMoE"):
        RoutingConfig(router="expert_choice", local_entropy_loss_weight=0.1).validate(8)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="scale_init"):
        ContrastiveConfig(scale_init=0.0).validate()
    with pytest.raises(ValueError, match="shared backbone"):
        ContrastiveConfig(shared=True, text=TextConfig(moe=MoeConfig(layers=(1,)))).validate()
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TextConfig(hidden_size=30, num_heads=4).validate()


@pytest.mark.parametrize("shared", [False, True])
def test_saved_and_loaded(tmp_path, shared):
    model = _model(shared=shared, scale_init=10.0, bias_init=-10.0).eval()
    model.save_pretrained(str(tmp_path / "m"))
    loaded = ContrastiveModel.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config
    images, texts = torch.randn(3, 3, 32, 32), torch.randint(0, 20, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, texts), model(images, texts), rtol=0, atol=0)
    from vmoe_torch import create_model
    create_model("vmoe_mi4_every2_e8_k2").save_pretrained(str(tmp_path / "classifier"))
    with pytest.raises(ValueError, match="not a contrastive model directory"):
        ContrastiveModel.from_pretrained(str(tmp_path / "classifier"))


def test_named_models():
    from vmoe_torch.models.contrastive import create_contrastive_model
    limoe = create_contrastive_model("limoe_mi8_every2_e8_k2")
    assert limoe.config.shared and limoe.config.image.moe.routing.local_entropy_loss_weight > 0
    two = create_contrastive_model("contrastive_mi8_every2_e8_k2", embed_dim=32)
    assert not two.config.shared and two.config.embed_dim == 32
    z = two.eval()(images=torch.randn(2, 3, 40, 40))
    assert z.shape == (2, 32)
    with pytest.raises(ValueError, match="Unknown contrastive model"):
        create_contrastive_model("clip")


@pytest.mark.parametrize("kind", ["soft", "eee"])
def test_any_of_our_image_models_is_a_tower(kind):
    """Soft MoE and E^3 image towers (E^3: the members' embeddings averaged)."""
    if kind == "soft":
        image = resolve_config("vmoe_soft_mi4_half", num_classes=10)
    else:
        image = resolve_config("vmoe_mi4_every2_e8_k2", num_classes=10, ensemble_size=2, num_selected_experts=1)
    text = TextConfig(vocab_size=20, max_len=6, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64)
    model = ContrastiveModel(ContrastiveConfig(image=image, text=text, embed_dim=16)).train()
    images, texts = torch.randn(3, 3, 32, 32), torch.randint(0, 20, (3, 6))
    logits = model(images, texts)
    assert logits.shape == (3, 3)
    (sigmoid_loss(logits).mean() + model.auxiliary_loss).backward()
    z = model.eval()(images=images)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3), rtol=1e-5, atol=1e-5)
