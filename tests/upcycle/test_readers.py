"""Dense ViT readers: a model built by the source library itself (random
weights, nothing downloaded) and our dense twin give the same logits within
1e-5 on the same images, each under its own input normalisation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODELS, load_json
from helpers import perturb
from safetensors.torch import save_file

from vmoe_torch.upcycling import SourceError, dense_model, read_dense

pytestmark = pytest.mark.numerics  # tolerances derived from floating point (make test-numerics)

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

IMAGES_01 = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _ours(model):
    with torch.no_grad():
        return model(IMAGES_01 * 2 - 1)


def _timm_vit(**kw):
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    base = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7)
    base.update(kw)
    return perturb(VisionTransformer(**base))


@pytest.mark.parametrize("kw", [dict(), dict(class_token=False, global_pool="avg"),
                                dict(class_token=False, global_pool="avg", fc_norm=False)])
def test_timm_file_equals_timm_forward(kw, tmp_path):
    src = _timm_vit(**kw)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    ours = dense_model(str(path), "timm", num_heads=3, normalization="inception")
    with torch.no_grad():
        ref = src((IMAGES_01 - 0.5) / 0.5)
    torch.testing.assert_close(_ours(ours), ref, rtol=1e-5, atol=1e-5)
    assert ours.config.gelu == "erf" and ours.config.layer_norm_eps == 1e-6


def test_timm_pth_and_module_and_nonstandard_normalisation(tmp_path):
    src = _timm_vit()
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    from_file = dense_model(str(tmp_path / "vit.pth"), num_heads=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    torch.testing.assert_close(_ours(from_file), _ours(dense_model(src, normalization="inception")),
                               rtol=0, atol=0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    folded = dense_model(src, mean=mean, std=std)
    with torch.no_grad():
        ref = src((IMAGES_01 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    torch.testing.assert_close(_ours(folded), ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_ours(folded), _ours(from_file), atol=1e-3)  # the convention matters


def test_torchvision_vit_equals_its_forward(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    src = perturb(VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=48,
                                     mlp_dim=96, num_classes=5, representation_size=24))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "tv.safetensors"))
    ours = dense_model(str(tmp_path / "tv.safetensors"), "torchvision", num_heads=4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        ref = src((IMAGES_01 - mean) / std)  # torchvision's ImageNet normalisation
    torch.testing.assert_close(_ours(ours), ref, rtol=1e-5, atol=1e-5)
    assert ours.config.representation_size == 24


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "ViTModel"])
def test_huggingface_vit_directory_equals_its_forward(cls_name, tmp_path):
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96, num_labels=6)
    torch.manual_seed(0)
    src = perturb(getattr(transformers, cls_name)(cfg))
    src.save_pretrained(str(tmp_path / "hf"))   # config.json + model.safetensors
    (tmp_path / "hf" / "preprocessor_config.json").write_text(
        '{"image_processor_type": "ViTImageProcessor", "image_mean": [0.5, 0.5, 0.5], '
        '"image_std": [0.5, 0.5, 0.5], "do_normalize": true, "do_rescale": true}')
    ours = dense_model(str(tmp_path / "hf"), "hf")
    assert ours.config.layer_norm_eps == 1e-12 and ours.config.num_heads == 4
    with torch.no_grad():
        out = src(pixel_values=(IMAGES_01 - 0.5) / 0.5)  # ViTImageProcessor's mean/std 0.5
        if cls_name == "ViTModel":
            ref, mine = out.pooler_output, ours.forward_head(ours.forward_features(IMAGES_01 * 2 - 1))
        else:
            ref, mine = out.logits, _ours(ours)
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["j_vit_jax_npz_token", "j_vit_jax_npz_gap"])
@pytest.mark.parametrize("names", ["model.npz", "model_linen_names.npz"])
def test_vit_jax_npz_reproduces_reference_logits(case, names):
    d = MODELS / case
    classifier = load_json(d / "config.json")["model_config"]["classifier"]
    images = torch.from_numpy(np.load(d / "images.npy")).permute(0, 3, 1, 2)
    ours = dense_model(str(d / names), classifier=classifier, image_size=tuple(images.shape[2:]))
    with torch.no_grad():
        logits = ours(images).numpy()
    np.testing.assert_allclose(logits, np.load(d / "logits.npy"), atol=2e-5, rtol=0)


def test_native_dense_checkpoint_is_a_source():
    d = MODELS / "d_dense_vit"
    ours = dense_model(str(d / "ckpt"), "native")
    images = torch.from_numpy(np.load(d / "images.npy")).permute(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(ours(images).numpy(), np.load(d / "logits.npy"), atol=2e-5)


def test_unsupported_variants_and_bad_files_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="register tokens"):
        read_dense(_timm_vit(reg_tokens=2).state_dict(), "timm")
    with pytest.raises(SourceError, match="layer scale"):
        read_dense(_timm_vit(init_values=1e-5).state_dict(), "timm")
    with pytest.raises(SourceError, match="qk-norm"):
        read_dense(_timm_vit(qk_norm=True).state_dict(), "timm")
    with pytest.raises(SourceError, match="class token"):
        read_dense(_timm_vit(global_pool="avg", fc_norm=True).state_dict(), "timm")
    with pytest.raises(SourceError, match="Unknown key layout"):
        read_dense({"foo.weight": torch.zeros(2)})
    with pytest.raises(SourceError, match="no mapping"):
        read_dense({**_timm_vit().state_dict(), "extra.weight": torch.zeros(1)}, "timm")
    state = {k: v.contiguous() for k, v in _timm_vit().state_dict().items()}
    torch.save(state, tmp_path / "pickle.safetensors")
    with pytest.raises(SourceError, match="not a safetensors file"):
        read_dense(str(tmp_path / "pickle.safetensors"))
    save_file(state, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="cut.safetensors"):
        read_dense(str(tmp_path / "cut.safetensors"))
    with pytest.raises(SourceError, match="num_heads"):
        read_dense(_timm_vit(embed_dim=40, num_heads=4).state_dict(), "timm")
    dropped = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    dropped.update({k.replace("blocks.0.", "blocks.2."): v for k, v in state.items() if k.startswith("blocks.0.")})
    with pytest.raises(SourceError, match="not numbered"):
        read_dense(dropped, "timm", num_heads=3)
