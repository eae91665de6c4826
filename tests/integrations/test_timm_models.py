"""timm's generic model checks (the checks of timm's tests/test_models.py,
timm 1.0) run over the names we register with timm.

Contract checks (factory keywords, API, default cfg, head removal, device /
dtype handling) run for EVERY registered name on the meta device, as timm
runs them. Checks that need real numbers (forward, backward, features,
forward_intermediates, FX forward and backward) run for every registered
name up to 60M parameters, at the input size timm's tests would pick.

Not ported: TorchScript (`torch.jit` is deprecated upstream; our models are
exported with torch.export / ONNX / torch.compile instead, see
tests/integrations/test_export.py) and pretrained downloads (nothing is
downloaded). E^3 models meet the same contract: one row per image (the
members' mean), at every depth of the feature API too.
"""
from __future__ import annotations

import fnmatch
import inspect
import math

import pytest
import torch

timm = pytest.importorskip("timm")
from timm.models import get_notrace_functions, get_notrace_modules  # noqa: E402
from timm.models._manipulate import group_parameters  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402

import vmoe_torch  # noqa: E402,F401  (registers the models)
from vmoe_torch.integrations.timm import timm_names  # noqa: E402

ALL = sorted(timm_names())


def _meta_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, device="meta").parameters())


REAL = [n for n in ALL if _meta_params(n) <= 60_000_000]


def _rows(model, batch: int) -> int:  # noqa: ARG001 - E^3 included: one row per image
    """Rows of the output: one per image, E^3 models included."""
    return batch


def _input_size(model, target: int) -> tuple[int, ...]:
    """timm's choice: the default size, shrunk to `target` unless fixed."""
    cfg = model.default_cfg
    size = cfg["input_size"]
    if cfg.get("fixed_input_size") or max(size) <= target:
        return size
    return (size[0], *[min(s, target) for s in size[1:]])


def _x(size: tuple[int, ...], batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, *size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_real_tensor_set_covers_every_family():
    assert len(REAL) >= 12
    for pattern in ("vmoe_dense_*", "vmoe_*_e8_k2", "vmoe_eee_*", "vmoe_soft_*", "*_ilsvrc2012*"):
        assert fnmatch.filter(REAL, pattern), pattern


# ------------------------------------------------------------------ contract
@pytest.mark.parametrize("name", ALL)
def test_model_default_cfgs_non_std(name):
    with torch.device("meta"):
        model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    with pytest.raises(TypeError):  # unknown constructor arguments are refused
        timm.create_model(name, device="meta", not_a_model_arg=1)
    assert inspect.signature(model.reset_classifier).parameters["global_pool"].default is None
    names = [n for n, _ in model.named_parameters()]
    state = model.state_dict()
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 1
    for pattern in model.no_weight_decay():
        assert any(fnmatch.fnmatch(n, pattern) for n in names), pattern
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg = model.default_cfg
    assert model.in_chans == cfg["input_size"][0]
    x = torch.randn(1, *cfg["input_size"], device="meta")
    features = model.forward_features(x)
    pre = model.forward_head(features, pre_logits=True)
    assert features.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size
    model.to(torch.bfloat16)  # a dtype change after a forward leaves nothing stale
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    model.reset_classifier(0)
    out = model(x)
    assert model.num_classes == 0 and out.shape == pre.shape and out.shape[-1] == model.head_hidden_size
    headless = timm.create_model(name, num_classes=0, device="meta", dtype=torch.float32).eval()
    out = headless(x)
    assert out.shape[-1] == headless.num_features == headless.head_hidden_size
    if cfg.get("num_classes"):
        assert cfg["classifier"] + ".weight" in state
    assert cfg["first_conv"] + ".weight" in state
    # reset_classifier keeps the model's device, dtype and mode
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    head = list(model.get_classifier().parameters())
    assert head and all(p.device.type == "meta" and p.dtype == torch.float64 for p in head)
    assert all(not m.training for m in model.modules())
    # the factory places everything on the requested device
    placed = timm.create_model(name, device="meta", dtype=torch.float32)
    assert all(t.device.type == "meta" for t in [*placed.parameters(), *placed.buffers()])
    # frozen parameters stay frozen through a head reset and an input-size change
    placed.requires_grad_(False)
    placed.reset_classifier(0)
    placed.set_input_size(img_size=tuple(2 * s for s in placed.default_cfg["input_size"][-2:]))
    assert not [n for n, p in placed.named_parameters() if p.requires_grad]


# -------------------------------------------------------------- real tensors
@pytest.mark.parametrize("name", REAL)
def test_model_forward(name):
    model = timm.create_model(name).eval()
    x = _x(_input_size(model, 384), 1)
    out = model(x)
    assert out.shape[0] == _rows(model, 1) and not out.isnan().any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", REAL)
def test_model_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(_x(_input_size(model, 128), 2))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert out.shape[-1] == 42 and not out.isnan().any()


@pytest.mark.parametrize("name", REAL)
def test_model_forward_features(name):
    model = timm.create_model(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    size = _input_size(model, 96)
    outputs = model(_x(size, 1))
    assert len(outputs) == len(channels)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[1] == c and o.shape[0] == 1  # E^3 too: the members' mean after the first MoE block
        assert size[1] / (2 * r) < o.shape[2] <= math.ceil(size[1] / r) + 1
        assert size[2] / (2 * r) < o.shape[3] <= math.ceil(size[2] / r) + 1
        assert not o.isnan().any()


@pytest.mark.parametrize("name", REAL)
def test_model_forward_intermediates(name):
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= 3
    size = _input_size(model, 96)
    x = _x(size, 1)
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    assert len(intermediates) == len(info.channels())
    for c, r, o in zip(info.channels(), info.reduction(), intermediates):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(size[1] / r) + 1 and not o.isnan().any()
    torch.testing.assert_close(final, model.forward_features(x), rtol=1e-5, atol=1e-8)
    model.set_grad_checkpointing()
    again, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(again, final, rtol=1e-5, atol=1e-8)


def _fx_model(model, train: bool = False):
    """timm's FX wrapper: trace with timm's no-trace modules and functions and
    return the graph's output node(s)."""
    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kwargs)


@pytest.mark.parametrize("name", REAL)
def test_model_forward_fx(name):
    model = timm.create_model(name).eval()
    x = _x(_input_size(model, 128), 1)
    with torch.inference_mode():
        want = model(x)
        got = torch.cat(tuple(_fx_model(model)(x).values()))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert got.shape[0] == _rows(model, 1)


@pytest.mark.parametrize("name", REAL)
def test_model_backward_fx(name):
    model = timm.create_model(name, num_classes=42).train()
    fx = _fx_model(model, train=True)
    out = torch.cat(tuple(fx(_x(_input_size(model, 128), 2)).values()))
    out.mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, missing
    assert out.shape[-1] == 42 and not out.isnan().any()
