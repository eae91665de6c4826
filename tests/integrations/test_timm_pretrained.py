"""Loading save_pretrained directories through timm's create_model: the saved
config.json is checked as from_pretrained checks it, keywords that would
change the architecture are refused naming each difference, and
`vmoe_pretrained` loads any saved model (an upcycled one included)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import vmoe_torch
from vmoe_torch import from_pretrained, save_pretrained

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

PRESET = "vmoe_mi4_every2_e8_k2"


def _x(n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _open(path, name=PRESET, **kw):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kw).eval()


@pytest.fixture(scope="module")
def upcycled_hf(tmp_path_factory):
    """An upcycled Hugging Face ViT: exact GELU, eps 1e-12, 48 wide (no preset has it)."""
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, num_labels=6)
    torch.manual_seed(0)
    hf = transformers.ViTForImageClassification(cfg).eval()
    model = vmoe_torch.upcycle(hf, "E=4, K=2, Every 2", read_options={"normalization": "inception"})
    path = tmp_path_factory.mktemp("upcycled") / "m"
    save_pretrained(model, str(path))
    return path, model


def test_vmoe_pretrained_loads_any_saved_model_exactly(upcycled_hf):
    path, model = upcycled_hf
    assert model.config.gelu == "erf" and model.config.layer_norm_eps == 1e-12
    loaded = _open(path, "vmoe_pretrained")
    with torch.no_grad():
        torch.testing.assert_close(loaded(_x()), from_pretrained(str(path))(_x()), rtol=0, atol=0)
    assert loaded.config == model.config and loaded.pretrained_cfg["num_classes"] == 6
    # timm's train.py --pretrained-path adds num_classes=-1 to the overlay and passes --num-classes.
    adapted = timm.create_model("vmoe_pretrained", pretrained=True, num_classes=3, img_size=48,
                                pretrained_cfg_overlay={"file": str(path / "model.safetensors"),
                                                        "num_classes": -1}).eval()
    assert adapted(_x(2, 48)).shape == (2, 3)
    with torch.no_grad():
        torch.testing.assert_close(adapted.blocks[1].mlp.experts.w1, model.blocks[1].mlp.experts.w1)
    feats = timm.create_model("vmoe_pretrained", pretrained=True, features_only=True,
                              pretrained_cfg_overlay={"file": str(path)})
    assert len(feats(_x())) >= 1
    with pytest.raises(ValueError, match="config.json"):
        timm.create_model("vmoe_pretrained")


def test_a_preset_that_does_not_build_the_saved_model_is_refused(tmp_path, upcycled_hf):
    path, _ = upcycled_hf
    with pytest.raises(ValueError, match=r"hidden_size: saved 48.*vmoe_pretrained"):
        _open(path)
    src = timm.create_model(PRESET, num_classes=10).eval()
    erf = vmoe_torch.models.VisionTransformerMoe(dataclasses.replace(src.config, gelu="erf"))
    save_pretrained(erf, str(tmp_path / "erf"))
    with pytest.raises(ValueError, match=r"gelu: saved 'erf', requested 'tanh'"):
        _open(tmp_path / "erf")
    assert _open(tmp_path / "erf", "vmoe_pretrained").config.gelu == "erf"


def test_keywords_that_change_the_architecture_are_refused(tmp_path):
    src = timm.create_model(PRESET, num_classes=7).eval()  # the preset itself has 10 classes
    torch.nn.init.normal_(src.head.weight)
    save_pretrained(src, str(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"classifier: saved 'token', requested 'gap'"):
        _open(tmp_path / "m", global_pool="avg")
    with pytest.raises(ValueError, match="classifier"):
        _open(tmp_path / "m", "vmoe_pretrained", global_pool="avg")
    # The preset's 10 classes are not the file's 7: the saved head is loaded, not dropped.
    same = _open(tmp_path / "m")
    assert same.num_classes == 7 and same.pretrained_cfg["num_classes"] == 7
    with torch.no_grad():
        torch.testing.assert_close(same(_x()), src(_x()), rtol=0, atol=0)
    # Run-time settings may change: dropout, drop path, routing.
    tuned = timm.create_model(PRESET, pretrained=True, drop_path_rate=0.1, drop_rate=0.1,
                              pretrained_cfg_overlay={"file": str(tmp_path / "m")}).eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(_x()), src(_x()), rtol=0, atol=0)
