"""timm: registry, create_model keywords, the model contract its tools rely
on (data config, optimizer factory with layer decay, feature wrappers,
gradient checkpointing, stochastic depth, input-size changes) and
pretrained loading from local files."""
from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")

import vmoe_torch  # noqa: E402  (registers the models)
from vmoe_torch.integrations.timm import timm_names  # noqa: E402

SMALL = ["vmoe_mi4_every2_e8_k2", "vmoe_dense_mi4", "vmoe_soft_mi4_half", "vmoe_eee_mi4_every2_e8_k1_m2"]


def _x(b=2, size=32):
    return torch.rand(b, 3, size, size) * 2 - 1


def test_every_preset_and_released_architecture_is_registered():
    registered = set(timm.list_models("*"))
    assert set(timm_names()) <= registered
    assert {"vmoe_s32_last2_e8_k2", "vmoe_dense_b16", "vmoe_soft_b16_128e",
            "vmoe_b16_imagenet21k_randaug_strong_ft_cifar10", "eee_s32_last2_ilsvrc2012"} <= registered
    for name in vmoe_torch.list_models():  # every preset has a timm name
        assert name in timm_names().values()


def test_create_model_takes_timm_keywords():
    m = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=7, img_size=48, drop_rate=0.1,
                          drop_path_rate=0.2, global_pool="avg", in_chans=1)
    cfg = m.config
    assert (cfg.num_classes, cfg.image_size, cfg.dropout_rate, cfg.drop_path_rate, cfg.classifier, cfg.in_chans) \
        == (7, (48, 48), 0.1, 0.2, "gap", 1)
    assert m.cls_token is None and m.pretrained_cfg["input_size"] == (1, 48, 48)
    assert m.eval()(torch.rand(2, 1, 48, 48)).shape == (2, 7)
    assert timm.create_model("vmoe_mi4_every2_e8_k2", num_experts=4).config.moe.num_experts == 4
    with pytest.raises(ValueError, match="global_pool='max' is not supported"):
        timm.create_model("vmoe_mi4_every2_e8_k2", global_pool="max")
    with pytest.raises(ValueError, match="Unknown override"):
        timm.create_model("vmoe_mi4_every2_e8_k2", not_a_field=1)


def test_pretrained_cfg_gives_the_right_normalisation():
    m = timm.create_model("vmoe_s32_last2_e8_k2")
    data = timm.data.resolve_data_config(model=m)
    assert data["mean"] == data["std"] == (0.5, 0.5, 0.5) and data["input_size"] == (3, 224, 224)
    t = timm.data.create_transform(**data)
    from PIL import Image
    x = t(Image.new("RGB", (300, 260), (255, 0, 128)))
    assert x.shape == (3, 224, 224) and x.max() == 1.0 and x.min() == -1.0  # [-1, 1], as the model expects
    for key in ("first_conv", "classifier", "interpolation", "crop_pct", "num_classes"):
        assert key in m.default_cfg
    assert dict(m.named_parameters())["patch_embed.proj.weight"] is m.get_submodule(m.default_cfg["first_conv"]).weight


@pytest.mark.parametrize("name", SMALL)
def test_contract_methods(name):
    m = timm.create_model(name, num_classes=5).eval()
    x = _x()
    logits = m(x)
    torch.testing.assert_close(m.forward_head(m.forward_features(x)), logits)
    feats = m.forward_head(m.forward_features(x), pre_logits=True)
    assert feats.shape[-1] == m.num_features == m.head_hidden_size
    assert m.num_classes == 5 and m.get_classifier() is m.head
    m.reset_classifier(3, None)
    assert m.num_classes == 3 and m(x).shape[-1] == 3 and m.pretrained_cfg["num_classes"] == 3
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), torch.nn.Identity) and m(x).shape[-1] == m.num_features
    m.reset_classifier(4, m.global_pool)  # its own pooling is accepted
    with pytest.raises(ValueError, match="fix the pooling"):
        m.reset_classifier(4, "map")
    groups = m.group_matcher()
    assert set(groups) == {"stem", "blocks"}


@pytest.mark.parametrize("name", SMALL)
def test_forward_intermediates_and_features_only(name):
    m = timm.create_model(name).eval()
    x = _x()
    final, inter = m.forward_intermediates(x, indices=2)
    torch.testing.assert_close(final, m.forward_features(x))
    grid = m.config.grid
    assert len(inter) == 2 and all(t.shape[1:] == (m.num_features, *grid) for t in inter)
    assert inter[-1].shape[0] == 2  # E^3 too: the members' mean
    only = m.forward_intermediates(x, indices=[0, -1], intermediates_only=True, output_fmt="NLC")
    assert [t.shape[1] for t in only] == [grid[0] * grid[1]] * 2
    info = m.feature_info
    assert len(info) == len(m.blocks) and info[0]["reduction"] == m.config.patch_size[0]
    f = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    outs = f(x)
    assert [o.shape[1] for o in outs] == f.feature_info.channels()
    missing, _ = m.load_state_dict(f.model.state_dict(), strict=False)  # the wrapper pruned blocks 4..
    assert missing and all(k.startswith(("blocks.4", "blocks.5", "blocks.6", "blocks.7", "norm", "head"))
                           for k in missing)
    torch.testing.assert_close(outs[1], m.forward_intermediates(x, indices=[3], intermediates_only=True)[0])
    kept = m.prune_intermediate_layers(indices=[1])
    assert kept == [1] and len(m.blocks) == 2


def test_timm_optimizer_factory_with_layer_decay_respects_roles():
    from timm.optim import create_optimizer_v2
    m = timm.create_model("vmoe_mi4_every2_e8_k2")
    opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    names = dict(m.named_parameters())
    assert by_param[id(names["blocks.1.mlp.experts.b1"])]["weight_decay"] == 0.0
    assert by_param[id(names["blocks.1.mlp.experts.w1"])]["weight_decay"] == 0.05
    assert by_param[id(names["pos_embed"])]["weight_decay"] == 0.0
    scales = {g["lr_scale"] for g in opt.param_groups}
    assert len(scales) > 3  # per-block learning-rate scales: group_matcher is used


@pytest.mark.parametrize("name", ["vmoe_mi4_every2_e8_k2", "vmoe_eee_mi4_every2_e8_k1_m2"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=5, drop_path_rate=0.1).train()
    x = _x(4)

    def grads(checkpointing):
        m.zero_grad()
        m.set_grad_checkpointing(checkpointing)
        m.set_noise_seed(3)
        torch.manual_seed(1)  # the same dropout / drop-path draws
        loss = m(x).logsumexp(-1).mean() + m.auxiliary_loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    l0, g0 = grads(False)
    l1, g1 = grads(True)
    assert torch.equal(l0, l1) and g0.keys() == g1.keys()
    assert g0["blocks.1.mlp.router.weight"].abs().sum() > 0  # the auxiliary loss reaches the router
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def test_stochastic_depth():
    m = timm.create_model("vmoe_dense_mi4", drop_path_rate=0.5)
    rates = [b.drop_path.p if hasattr(b.drop_path, "p") else 0.0 for b in m.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5) and rates == sorted(rates)
    x = _x(8)
    m.eval()
    eval_out = m.forward_features(x)
    torch.testing.assert_close(m.forward_features(x), eval_out)  # inactive at evaluation
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m.forward_features(x), eval_out)
    plain = timm.create_model("vmoe_dense_mi4")
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in plain.blocks)


def test_set_input_size_and_dynamic_img_size():
    m = timm.create_model("vmoe_mi4_every2_e8_k2").eval()
    with pytest.raises(ValueError, match="position embedding"):
        m(_x(2, 48))
    m.set_input_size(img_size=48)
    assert m(_x(2, 48)).shape == (2, m.num_classes) and m.pretrained_cfg["input_size"] == (3, 48, 48)
    with pytest.raises(ValueError, match="patch size"):
        m.set_input_size(patch_size=8)
    d = timm.create_model("vmoe_mi4_every2_e8_k2", dynamic_img_size=True).eval()
    for size in (24, 40):
        assert d(_x(2, size)).shape == (2, d.num_classes)
    assert not d.pretrained_cfg["fixed_input_size"]


def test_pretrained_loads_local_files_only(tmp_path):
    src = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=10).eval()
    torch.nn.init.normal_(src.head.weight)
    from vmoe_torch import save_pretrained
    save_pretrained(src, str(tmp_path / "m"))
    x = _x()
    same = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=10, pretrained=True,
                             pretrained_cfg_overlay={"file": str(tmp_path / "m")}).eval()
    torch.testing.assert_close(same(x), src(x))
    new_head = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=3, pretrained=True,
                                 pretrained_cfg_overlay={"file": str(tmp_path / "m" / "model.safetensors"),
                                                         "num_classes": 10}).eval()
    torch.testing.assert_close(new_head.forward_features(x), src.forward_features(x))
    assert new_head(x).shape == (2, 3)
    with pytest.raises(ValueError, match="nothing is downloaded"):
        timm.create_model("vmoe_mi4_every2_e8_k2", pretrained=True)
    with pytest.raises(FileNotFoundError, match="not found"):
        timm.create_model("vmoe_mi4_every2_e8_k2", pretrained=True, pretrained_cfg_overlay={"file": "/nope"})


def test_save_pretrained_round_trips_after_contract_changes(tmp_path):
    from vmoe_torch import from_pretrained, save_pretrained
    m = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=10).eval()
    m.reset_classifier(4)
    torch.nn.init.normal_(m.head.weight)
    m.set_input_size(img_size=40)
    m.set_routing(layers=[1], capacity_factor=0.5, batch_priority=True)
    save_pretrained(m, str(tmp_path / "m"))
    back = from_pretrained(str(tmp_path / "m"))
    x = _x(3, 40)
    torch.testing.assert_close(back(x), m(x))
    assert back.config == m.config


def test_class_level_save_and_load_and_timm_checkpoint_helpers(tmp_path):
    """Symmetric save_pretrained / from_pretrained on the class and the
    package; timm's save_for_hf and load_checkpoint work on our models."""
    from vmoe_torch import VisionTransformerMoe
    m = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=5).eval()
    torch.nn.init.normal_(m.head.weight)
    m.save_pretrained(str(tmp_path / "ours"))
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = _x()
    torch.testing.assert_close(VisionTransformerMoe.from_pretrained(str(tmp_path / "ours"))(x), m(x))
    vmoe_torch.save_pretrained(m, str(tmp_path / "pkg"))
    torch.testing.assert_close(vmoe_torch.from_pretrained(str(tmp_path / "pkg"))(x), m(x))
    timm.models.save_for_hf(m, str(tmp_path / "hf"), safe_serialization=True)
    other = timm.create_model("vmoe_mi4_every2_e8_k2", num_classes=5).eval()
    timm.models.load_checkpoint(other, str(tmp_path / "hf" / "model.safetensors"))
    torch.testing.assert_close(other(x), m(x))
