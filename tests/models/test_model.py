"""The model: shapes, API, presets, placement, position embeddings, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vmoe_torch
from vmoe_torch import ModelConfig, create_model, list_models
from vmoe_torch.layers import resample_pos_embed
from vmoe_torch.models import every_n, last_n, parse_description, resolve_config


def tiny(**kw):
    base = dict(num_layers=2, layers=(0, 1))
    base.update(kw)
    return create_model("vmoe_mi4_every2_e8_k2", **base)


def test_forward_api_and_metrics_schema():
    model = tiny(group_size=65 * 2).eval()
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits2, metrics = model(x, return_metrics=True)
    torch.testing.assert_close(logits, logits2)
    assert metrics["auxiliary_loss"].dim() == 0
    for i in (0, 1):
        for name in ("auxiliary_loss", "importance_loss", "gshard_loss", "dropped_fraction",
                     "no_expert_fraction", "top_gate_mean", "top_gate_min"):
            assert metrics[f"encoderblock_{i}/{name}"].shape == (2,), name
        assert metrics[f"encoderblock_{i}/expert_load"].shape == (2, 8)
    expected = sum(metrics[f"encoderblock_{i}/auxiliary_loss"].mean() for i in (0, 1))
    torch.testing.assert_close(metrics["auxiliary_loss"], expected)


def test_forward_head_pre_logits_and_reset_classifier():
    model = create_model("vmoe_dense_mi4", representation_size=24).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 24) and float(pre.detach().abs().max()) <= 1.0   # after tanh
    torch.testing.assert_close(model.head(pre), model(x))
    model.reset_classifier(5, keep_representation=False)
    assert model(x).shape == (2, 5) and float(model(x).abs().sum()) == 0.0  # zero-init head
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 64)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)


def test_head_init():
    model = create_model("vmoe_dense_mi4", num_classes=7)
    assert float(model.head.weight.abs().sum()) == 0
    torch.testing.assert_close(model.head.bias, torch.full((7,), -np.log(7), dtype=torch.float32))


@pytest.mark.parametrize("classifier,pos", [("token", "learned"), ("gap", "sincos2d"), ("map", "none"),
                                            ("token", "sincos2d")])
def test_classifiers_and_position_embeddings(classifier, pos):
    model = tiny(classifier=classifier, position_emb=pos)
    logits, metrics = model(torch.randn(2, 3, 32, 32), return_metrics=True)
    (logits.sum() + metrics["auxiliary_loss"]).backward()
    assert model.blocks[0].mlp.router.weight.grad is not None


def test_placement_rules():
    assert every_n(12, 2) == (1, 3, 5, 7, 9, 11)
    assert every_n(8, 1) == tuple(range(8))
    assert last_n(8, 2) == (5, 7)
    assert last_n(24, 5) == (15, 17, 19, 21, 23)
    with pytest.raises(ValueError):
        last_n(8, 5)


def test_paper_descriptions_and_presets():
    cfg = parse_description("ViT-S/32, E=8, K=2, Last 2")
    assert (cfg.hidden_size, cfg.num_layers, cfg.mlp_dim, cfg.num_heads) == (512, 8, 2048, 8)
    assert cfg.moe.layers == (5, 7) and cfg.moe.num_experts == 8
    assert cfg.moe.routing.num_selected_experts == 2 and cfg.moe.group_size == 400
    cfg = parse_description("V-MoE-B/16, E=32, K=1, Every 2, 300 Epochs")
    assert cfg.moe.layers == (1, 3, 5, 7, 9, 11) and cfg.moe.group_size == 8 * 197
    for size, dims in {"L/16": (1024, 24, 4096, 16), "H/14": (1280, 32, 5120, 16)}.items():
        cfg = parse_description(f"ViT-{size}")
        assert (cfg.hidden_size, cfg.num_layers, cfg.mlp_dim, cfg.num_heads) == dims and cfg.moe is None
    assert "vmoe_s32_last2_e8_k2" in list_models() and "vmoe_dense_s32" in list_models()
    dense, sparse = resolve_config("vmoe_dense_s32"), resolve_config("vmoe_s32_last2_e8_k2")
    assert dense.hidden_size == sparse.hidden_size and dense.moe is None
    m = create_model("ViT-S/32, E=4, K=1, Every 2", num_classes=3)
    assert m.config.num_classes == 3 and len(m.moe_layers()) == 4


def test_set_routing_and_context_manager():
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with model.routing(num_selected_experts=1, capacity_factor=0.25, batch_priority=True):
        _, m = model(x, return_metrics=True)
        assert all(layer.routing.num_selected_experts == 1 for layer in model.moe_layers().values())
        assert float(m["encoderblock_0/dropped_fraction"].mean()) > 0.5
    assert all(layer.routing.num_selected_experts == 2 for layer in model.moe_layers().values())
    model.set_routing(layers=[1], capacity_factor=2.0)
    assert model.moe_layers()["encoderblock_1"].routing.capacity_factor == 2.0
    assert model.moe_layers()["encoderblock_0"].routing.capacity_factor == 1.05
    with pytest.raises(ValueError, match="not MoE layers"):
        create_model("vmoe_mi4_every2_e8_k2").set_routing(layers=[0], capacity_factor=1.0)


def test_position_embedding_resampling_matches_scipy_zoom():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    pe = torch.randn(1, 1 + 4 * 6, 8)
    out = resample_pos_embed(pe, (4, 6), (7, 9), num_prefix_tokens=1)
    grid = pe[0, 1:].reshape(4, 6, 8).numpy()
    ref = scipy_ndimage.zoom(grid, (7 / 4, 9 / 6, 1), order=1)
    np.testing.assert_allclose(out[0, 1:].reshape(7, 9, 8).numpy(), ref, atol=1e-5)
    torch.testing.assert_close(out[:, :1], pe[:, :1])


def test_other_resolution():
    model = create_model("vmoe_dense_mi4").eval()
    x = torch.randn(1, 3, 48, 48)
    with pytest.raises(ValueError, match="interpolate_pos_embed"):
        model(x)
    y1 = model(x, interpolate_pos_embed=True)
    model.resize_pos_embed((48, 48))
    torch.testing.assert_close(model(x), y1)
    assert model.config.image_size == (48, 48)


def test_bad_inputs_give_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 32, 32, 3))
    with pytest.raises(ValueError, match="multiple of the patch"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="num_selected_experts"):
        tiny(num_selected_experts=9)
    with pytest.raises(ValueError, match="num_selected_experts"):
        tiny(num_selected_experts=0)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        tiny(capacity=0)
    with pytest.raises(ValueError, match="Unknown model"):
        create_model("vmoe_xxl")
    with pytest.raises(ValueError, match="Cannot parse"):
        create_model("ViT-Q/16")
    with pytest.raises(ValueError, match="Unknown override"):
        create_model("vmoe_dense_mi4", hiden_size=3)
    with pytest.raises(ValueError, match="Unknown config key"):
        vmoe_torch.VisionTransformerMoe(hidden_sise=4)
    with pytest.raises(ValueError, match="outside"):
        tiny(layers=(5,))
    with pytest.raises(ValueError, match="group_size"):
        tiny(group_size=0)
    checked = tiny(check_finite=True)
    bad = torch.randn(1, 3, 32, 32)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        checked(bad)


def test_dense_vit_of_same_shape_has_fewer_params():
    dense, sparse = create_model("vmoe_dense_mi4"), create_model("vmoe_mi4_every2_e8_k2")
    def n(m):
        return sum(p.numel() for p in m.parameters())
    assert n(sparse) > n(dense)
    assert sparse.config.hidden_size == dense.config.hidden_size


def test_model_config_from_dict_round_trip():
    from vmoe_torch.config.typed import from_dict, to_dict
    cfg = resolve_config("vmoe_s32_last2_e8_k2")
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
