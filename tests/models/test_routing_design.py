"""The routing design: one RoutingConfig carried to the layer, routers that
share parameters, a model config that reports what runs, and qk-norm."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vmoe_torch import MoeMlp, RoutingConfig, VisionTransformerMoe, create_model, from_pretrained, save_pretrained
from vmoe_torch.models import LayerRouting


def _tiny(**kw):
    torch.manual_seed(0)
    return create_model("V-MoE-Mi/4, E=4, K=2, Every 1", num_classes=5, image_size=16,
                        num_layers=3, layers=[0, 1, 2], group_size=34, **kw).eval()


def test_updated_is_the_one_capacity_rule():
    r = RoutingConfig()
    assert r.updated(capacity=8) == dataclasses.replace(r, capacity=8, capacity_factor=None)
    assert r.updated(capacity=8).updated(capacity_factor=2.0).capacity is None
    with pytest.raises(ValueError, match="Unknown routing setting"):
        r.updated(capacity_factr=2.0)
    with pytest.raises(ValueError, match="exactly one"):
        r.updated(capacity=8, capacity_factor=2.0).validate(4)
    with pytest.raises(ValueError, match="finite"):
        r.updated(capacity_factor=float("inf")).validate(4)
    with pytest.raises(ValueError, match="num_selected_experts must be int"):
        RoutingConfig(num_selected_experts=True).validate(4)


def test_layer_gets_the_config_object_unchanged():
    cfg = RoutingConfig(num_selected_experts=2, capacity_factor=0.5, batch_priority=True)
    layer = MoeMlp(8, 16, 4, cfg, group_size=10)
    assert layer.routing is cfg
    model = _tiny()
    assert all(layer_.routing is model.config.moe.routing for layer_ in model.moe_layers().values())


def test_per_layer_routing_is_what_config_reports_and_saves(tmp_path):
    model = _tiny()
    x = torch.randn(4, 3, 16, 16)
    model.set_routing(layers=[1], capacity_factor=0.5, batch_priority=True)
    cfg = model.config
    assert cfg.moe.routing.capacity_factor == 1.05
    assert cfg.moe.layer_routing == (LayerRouting(1, model.blocks[1].mlp.routing),)
    save_pretrained(model, str(tmp_path / "m"))
    again = from_pretrained(str(tmp_path / "m"))
    assert again.config == cfg
    assert again.blocks[1].mlp.routing.batch_priority and not again.blocks[0].mlp.routing.batch_priority
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    # All layers changed: the shared setting moves into moe.routing, no overrides left.
    model.set_routing(capacity_factor=0.5, batch_priority=True)
    assert model.config.moe.layer_routing == () and model.config.moe.routing.batch_priority


def test_set_routing_is_all_or_nothing():
    model = create_model("vmoe_soft_mi4_half")
    before = model.routing_settings()
    with pytest.raises(ValueError, match="fixed by its parameters"):
        model.set_routing(num_slots=3)
    assert model.routing_settings() == before


def test_top_experts_and_expert_choice_share_the_gating_matrix():
    model = _tiny()
    x = torch.randn(4, 3, 16, 16)
    weight = model.blocks[0].mlp.router.weight
    with model.routing(router="expert_choice", capacity_factor=1.0):
        assert model.blocks[0].mlp.router.kind == "expert_choice"
        assert model.blocks[0].mlp.router.weight is weight
        _, m = model(x, return_metrics=True)
        assert "encoderblock_0/num_experts_per_item_max" in m
    assert model.blocks[0].mlp.router.kind == "top_experts"
    assert model.blocks[0].mlp.router.weight is weight
    assert dict(model.named_parameters())["blocks.0.mlp.router.weight"] is weight


def test_dispatch_impl_names_are_checked_and_einsum_matches():
    model = _tiny()
    x = torch.randn(4, 3, 16, 16)
    layer = model.blocks[0].mlp
    with pytest.raises(ValueError, match="Unknown dispatch_impl"):
        layer.dispatch_impl = "foo"
    with torch.no_grad():
        ref = model(x)
        for layer_ in model.moe_layers().values():
            layer_.dispatch_impl = "einsum"
        torch.testing.assert_close(model(x), ref, rtol=1e-6, atol=1e-6)
        with model.routing(router="expert_choice", capacity_factor=1.0):
            ec_einsum = model(x)
            for layer_ in model.moe_layers().values():
                layer_.dispatch_impl = "index"
            torch.testing.assert_close(model(x), ec_einsum, rtol=1e-6, atol=1e-6)


def test_moe_dropout_rate_is_its_own():
    model = _tiny(dropout_rate=0.1, moe={"dropout_rate": 0.3})
    assert model.blocks[0].mlp.experts.dropout.p == 0.3 and model.blocks[0].drop.p == 0.1
    model = _tiny(moe={"mlp_dim": 96})
    assert model.blocks[0].mlp.experts.mlp_dim == 96 and model.config.mlp_dim != 96


@pytest.mark.numerics
def test_qk_norm_matches_a_float64_recomputation():
    torch.manual_seed(0)
    cfg = dataclasses.replace(create_model("ViT-Mi/4", num_classes=3, image_size=16).config,
                              qk_norm=True, num_layers=1)
    model = VisionTransformerMoe(cfg).double().eval()
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.q_norm.weight.normal_()
        attn.k_norm.weight.normal_()
        x = torch.randn(2, 5, cfg.hidden_size, dtype=torch.float64)
        q, k, v = attn.qkv(x).chunk(3, -1)
        h, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        q, k, v = (t.view(2, 5, h, d) for t in (q, k, v))

        def ln(t, w):  # flax LayerNorm(use_bias=False), eps 1e-6, over the head dim
            mu = t.mean(-1, keepdim=True)
            return (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + 1e-6) * w
        q, k = ln(q, attn.q_norm.weight), ln(k, attn.k_norm.weight)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(2, 5, -1)
        torch.testing.assert_close(attn(x), attn.proj(out), rtol=1e-10, atol=1e-10)


def test_input_dtype_errors_say_what_to_do():
    model = _tiny()
    with pytest.raises(ValueError, match="uint8 pixels"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="torch.float64.*images.to"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="torch.float16"):
        model(torch.zeros(1, 3, 16, 16, dtype=torch.float16))


def test_from_pretrained_names_bad_files(tmp_path):
    from vmoe_torch import create_model as make
    model = make("vmoe_dense_mi4")
    save_pretrained(model, str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json.*not valid JSON"):
        from_pretrained(str(tmp_path / "m"))
    save_pretrained(model, str(tmp_path / "p"))
    torch.save(model.state_dict(), tmp_path / "p" / "model.safetensors")  # a pickle under the name
    with pytest.raises(ValueError, match="not a safetensors file"):
        from_pretrained(str(tmp_path / "p"))


def test_tampered_architecture_in_config_json_is_refused(tmp_path):
    import json as _json
    model = _tiny()
    save_pretrained(model, str(tmp_path / "m"))
    path = tmp_path / "m" / "config.json"
    meta = _json.loads(path.read_text())
    meta["model"]["moe"]["routing"]["capacity_factor"] = 2.0   # a routing edit is fine
    path.write_text(_json.dumps(meta))
    assert from_pretrained(str(tmp_path / "m")).blocks[0].mlp.routing.capacity_factor == 2.0
    meta["model"]["num_heads"] = 2 * meta["model"]["num_heads"]  # shapes still match: only the record tells
    path.write_text(_json.dumps(meta))
    with pytest.raises(ValueError, match="does not describe the architecture"):
        from_pretrained(str(tmp_path / "m"))


def test_metrics_travel_through_a_declared_channel_not_tuples():
    model = _tiny().train()
    x = torch.randn(4, 3, 16, 16)
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, inp, out: seen.append(type(out)))
    feats = model.forward_features(x)
    assert isinstance(feats, torch.Tensor) and all(t is torch.Tensor for t in seen)
    logits = model.forward_head(feats)
    aux = model.auxiliary_loss
    assert aux.dim() == 0 and aux.requires_grad and "encoderblock_0/importance_loss" in model.metrics
    (logits.square().mean() + aux).backward()
    assert model.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    logits2, metrics = model(x, return_metrics=True)
    assert metrics is model.metrics
    with pytest.raises(RuntimeError, match="No forward"):
        _ = create_model("vmoe_dense_mi4").auxiliary_loss


def test_group_size_is_a_run_time_setting_of_the_whole_model(tmp_path):
    model = _tiny()  # 17 tokens per image, groups of 34 (2 images)
    x = torch.randn(4, 3, 16, 16)
    grouped = model(x)
    assert model.metrics["encoderblock_0/capacity"].numel() == 1
    with model.routing(group_size=17):
        assert model.group_size == 17 and model.config.moe.group_size == 17
        assert all(layer.group_size == 17 for layer in model.moe_layers().values())
        per_image = model(x)
        assert model.metrics["encoderblock_0/dropped_fraction"].shape == (4,)  # one group per image
        assert torch.equal(per_image[:1], model(x[:1]))  # an image's prediction no longer depends on others
    assert model.group_size == 34 and torch.equal(model(x), grouped)
    model.set_routing(group_size=17)
    model.save_pretrained(str(tmp_path / "m"))
    assert from_pretrained(str(tmp_path / "m")).group_size == 17
    with pytest.raises(ValueError, match="without layers"):
        model.set_routing(layers=[0], group_size=34)
    with pytest.raises(ValueError, match="group_size must be"):
        model.set_routing(group_size=0)
    assert model.group_size == 17


def test_soft_moe_takes_a_group_size_only_where_its_slot_count_stays():
    soft = create_model("vmoe_soft_mi4_half")
    soft.set_routing(group_size=128)  # num_slots is explicit: p stays 2
    assert soft.group_size == 128
    derived = create_model("vmoe_mi4_every1_e8_k2", router="soft", capacity_factor=2.0, num_selected_experts=1,
                           group_size=64)
    with pytest.raises(ValueError, match="slot count is fixed"):
        derived.set_routing(group_size=128)
    assert derived.group_size == 64
