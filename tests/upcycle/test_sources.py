"""Dense sources as users have them: live Hugging Face modules (transformers
5.x names) and their saved directories, DeiTs with ImageNet normalisation
read from wherever it is recorded, a timm small described only by its MoE
part; and every refusal names the problem, the file and the fix."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import perturb
from safetensors.torch import save_file

from vmoe_torch.upcycling import SourceError, dense_model, read_dense, upcycle

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

IMAGES_01 = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1))
HF_IMAGENET = {"image_processor_type": "ViTImageProcessor", "image_mean": [0.485, 0.456, 0.406],
               "image_std": [0.229, 0.224, 0.225], "do_normalize": True, "do_rescale": True}


def _ours(model, images=IMAGES_01):
    with torch.no_grad():
        return model(images * 2 - 1)


def _imagenet(images=IMAGES_01):
    return (images - IMAGENET[0]) / IMAGENET[1]


def _hf(cls_name):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, num_labels=6)
    torch.manual_seed(0)
    return perturb(getattr(transformers, cls_name)(cfg))


def _hf_reference(src, pixel_values):
    with torch.no_grad():
        out = src(pixel_values=pixel_values)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def _ours_like(src, ours, images=IMAGES_01):
    if isinstance(src, transformers.ViTModel):
        with torch.no_grad():
            return ours.forward_head(ours.forward_features(images * 2 - 1))
    return _ours(ours, images)


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel"])
def test_live_huggingface_module_equals_its_forward_and_its_saved_directory(cls_name, tmp_path):
    src = _hf(cls_name)
    assert any(k.startswith(("layers.", "vit.layers.")) for k in src.state_dict())  # transformers 5.x names
    ours = dense_model(src, normalization="imagenet")      # a DeiT-style ImageNet normalisation
    torch.testing.assert_close(_ours_like(src, ours), _hf_reference(src, _imagenet()), rtol=1e-5, atol=1e-5)
    src.save_pretrained(str(tmp_path / "hf"))               # the on-disk names
    (tmp_path / "hf" / "preprocessor_config.json").write_text(json.dumps(HF_IMAGENET))
    saved = dense_model(str(tmp_path / "hf"))               # normalisation read from the preprocessor
    torch.testing.assert_close(_ours_like(src, saved), _ours_like(src, ours), rtol=0, atol=0)
    assert any("preprocessor_config.json" in n for n in read_dense(str(tmp_path / "hf")).notes)


def test_live_huggingface_module_without_a_normalisation_is_refused():
    with pytest.raises(SourceError, match="image_mean"):
        dense_model(_hf("ViTForImageClassification"))


def _deit(**kw):
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)
    return perturb(timm.create_model("deit_tiny_patch16_224", **{**args, **kw}))


def test_deit_normalisation_from_the_live_model_and_from_timm_config_json(tmp_path):
    src = _deit()
    with torch.no_grad():
        ref = src(_imagenet())
    torch.testing.assert_close(_ours(dense_model(src)), ref, rtol=1e-5, atol=1e-5)  # pretrained_cfg
    timm.models.save_for_hf(src, str(tmp_path / "deit"), safe_serialization=True, model_args={"num_heads": 3})
    from_dir = dense_model(str(tmp_path / "deit"))            # config.json's pretrained_cfg mean/std
    torch.testing.assert_close(_ours(from_dir), ref, rtol=1e-5, atol=1e-5)
    # The same weights with nothing recorded: refused, never read as mean 0.5.
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "deit.safetensors"))
    with pytest.raises(SourceError, match=r"deit\.safetensors.*normali[sz]ation.*--normalization"):
        dense_model(str(tmp_path / "deit.safetensors"), num_heads=3)
    given = dense_model(str(tmp_path / "deit.safetensors"), num_heads=3, normalization="imagenet")
    torch.testing.assert_close(_ours(given), ref, rtol=1e-5, atol=1e-5)


def test_deit_timm_training_checkpoint_uses_train_py_data_config(tmp_path):
    """timm's train.py normalises with its --mean/--std, else the
    architecture's pretrained_cfg; its .pth.tar records both."""
    import argparse
    src = _deit()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    torch.save({"arch": "deit_tiny_patch16_224", "state_dict": state,
                "args": argparse.Namespace(mean=None, std=None)}, tmp_path / "model_best.pth.tar")
    with torch.no_grad():
        ref = src(_imagenet())
    best = dense_model(str(tmp_path / "model_best.pth.tar"), num_heads=3)
    torch.testing.assert_close(_ours(best), ref, rtol=1e-5, atol=1e-5)
    torch.save({"arch": "deit_tiny_patch16_224", "state_dict": state,
                "args": argparse.Namespace(mean=[0.5] * 3, std=[0.25] * 3)}, tmp_path / "given.pth.tar")
    with torch.no_grad():
        ref = src((IMAGES_01 - 0.5) / 0.25)
    given = dense_model(str(tmp_path / "given.pth.tar"), num_heads=3)
    torch.testing.assert_close(_ours(given), ref, rtol=1e-5, atol=1e-5)


def test_timm_small_described_only_by_its_moe_part():
    """A timm ViT-S (384 wide, 12 blocks, 6 heads: no size of the V-MoE
    paper's table) upcycles from "E=4, K=2, Every 2"; forced dense routing
    (K = E, nothing dropped) computes timm's forward."""
    torch.manual_seed(0)
    src = perturb(timm.create_model("vit_small_patch16_224", img_size=32, num_classes=5), seed=2)
    assert src.embed_dim == 384 and len(src.blocks) == 12
    moe = upcycle(src, "E=4, K=2, Every 2")
    assert moe.config.hidden_size == 384 and moe.config.num_heads == 6
    assert moe.config.moe.layers == (1, 3, 5, 7, 9, 11) and not moe.config.moe.routing.bfloat16_dispatch
    assert moe.config.moe.group_size == 8 * moe.config.tokens_per_image
    with torch.no_grad():
        ref = src((IMAGES_01 - 0.5) / 0.5)  # vit_small_patch16_224's pretrained_cfg: 0.5
        with moe.routing(num_selected_experts=4, capacity_factor=4.0):
            torch.testing.assert_close(_ours(moe), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_ours(dense_model(src)), ref, rtol=1e-5, atol=1e-5)
    e3 = upcycle(src, "E=4, K=1, M=2, Last 2")
    assert e3.config.moe.ensemble_size == 2 and e3.config.moe.layers == (9, 11)
    soft = upcycle(src, "E=4, p=1")
    assert soft.config.moe.routing.router == "soft" and soft.config.moe.layers == tuple(range(6, 12))
    with pytest.raises(SourceError, match="give only the MoE part"):
        upcycle(src, "ViT-S/16, E=4, K=2, Every 2")   # the paper's S is 512 wide
    with pytest.raises(SourceError, match="E="):
        upcycle(src, "K=2, Every 2")


def test_messages_name_the_model_kind_and_the_file(tmp_path):
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                                  depth=1, num_heads=3)
    with pytest.raises(SourceError, match="distilled DeiT.*dist_token"):
        read_dense(distilled, normalization="imagenet")
    swin = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=24, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1))
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in swin.state_dict().items()}, str(path))
    for fmt in (None, "timm"):
        with pytest.raises(SourceError, match="Swin Transformer, not a plain Vision Transformer"):
            read_dense(str(path), fmt, normalization="imagenet")
    torch.save(_deit(), tmp_path / "whole_module.pt")   # a pickled module, not a state_dict
    with pytest.raises(SourceError, match="whole_module.pt") as e:
        read_dense(str(tmp_path / "whole_module.pt"))
    assert "weights_only=False" not in str(e.value) and "state_dict" in str(e.value)
    hf = _hf("ViTForImageClassification")
    hf.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(SourceError, match=r"hf/model\.safetensors.*preprocessor_config\.json"):
        read_dense(str(tmp_path / "hf"))
