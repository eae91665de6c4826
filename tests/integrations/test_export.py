"""Tracing and export of MoE models: FX symbolic tracing
(`create_feature_extractor`), `torch.export` with a dynamic batch, and ONNX
run by onnxruntime, each compared with eager at full and reduced capacity.
(`torch.compile(dynamic=True, fullgraph=True)`: tests/integrations/test_compile.py.)"""
from __future__ import annotations

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from vmoe_torch import create_model
from vmoe_torch.export import batch_multiple, export_onnx, export_program

REDUCED = {"capacity_factor": 0.5, "batch_priority": True}
CASES = {
    "dense": ("vmoe_dense_mi4", {}),
    "moe": ("vmoe_mi4_every2_e8_k2", {}),
    "moe_C0.5_bpr": ("vmoe_mi4_every2_e8_k2", REDUCED),
    "eee_C0.5_bpr": ("vmoe_eee_mi4_every2_e8_k1_m2", REDUCED),
    "soft": ("vmoe_soft_mi4_half", {}),
}


def _model(name: str, routing: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = {} if name.startswith("vmoe_dense") else {"layers": (1, 3)}
    model = create_model(name, num_layers=4, **layers, **routing).eval()
    assert model.head is not None
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the zero-initialised head would hide differences
    return model


def _images(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _dropped(model) -> float:
    return max(float(v.mean()) for k, v in model.metrics.items() if k.endswith("dropped_fraction"))


@pytest.mark.parametrize("case", list(CASES))
def test_fx_feature_extractor_equals_eager(case):
    name, routing = CASES[case]
    model = _model(name, routing)
    k = batch_multiple(model)
    x = _images(2 * k)
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "block1", "head": "logits"})
    with torch.no_grad():
        got = extractor(x)
        logits = model(x, members=True)  # the head node: E^3 member rows
        _, (block1,) = model.forward_intermediates(x, indices=[1], output_fmt="NLC")
    if "C0.5" in case:
        assert _dropped(model) > 0.05  # the reduced-capacity path really drops tokens
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=1e-6)
    fx_block1 = got["block1"]
    if model.members_per_image > 1:  # E^3: the feature API gives the members' mean
        fx_block1 = fx_block1.unflatten(0, (-1, model.members_per_image)).mean(1)
    assert fx_block1.shape[-1] == block1.shape[-1]
    torch.testing.assert_close(fx_block1[:, -block1.shape[1]:], block1, rtol=0, atol=1e-6)


def test_fx_graph_keeps_input_checks_and_trains():
    model = _model("vmoe_mi4_every2_e8_k2", {})
    traced = torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match="permute"):
        traced(_images(8).permute(0, 2, 3, 1))
    traced.train()
    traced(_images(16)).mean().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, missing  # the router included: its gates scale the expert outputs


@pytest.mark.parametrize("case", ["moe", "moe_C0.5_bpr", "eee_C0.5_bpr"])
def test_export_with_dynamic_batch_equals_eager(case):
    name, routing = CASES[case]
    model = _model(name, routing)
    k = batch_multiple(model)
    program = export_program(model, _images(k))
    exported = program.module()
    for groups in (1, 2, 3):
        x = _images(groups * k, seed=groups)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=0, atol=1e-5)
    with pytest.raises((AssertionError, RuntimeError), match="Guard failed"):
        exported(_images(k + 1))  # not a whole number of routing groups


def test_batch_multiple_follows_the_group_layout():
    assert batch_multiple(_model("vmoe_dense_mi4", {})) == 1
    model = _model("vmoe_mi4_every2_e8_k2", {})  # 65 tokens per image, 520-token groups
    assert batch_multiple(model) == 8
    assert batch_multiple(_model("vmoe_mi4_every2_e8_k2", {"group_size": 130})) == 2
    with pytest.raises(ValueError, match="group_size"):
        batch_multiple(_model("vmoe_mi4_every2_e8_k2", {"group_size": None}))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["moe", "moe_C0.5_bpr", "eee_C0.5_bpr", "ties_C0.5_bpr"])
def test_onnx_runtime_equals_eager(case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    name, routing = CASES.get(case, ("vmoe_mi4_every2_e8_k2", REDUCED))
    model = _model(name, routing)
    if case.startswith("ties"):
        # Every gate equal: top-K and the BPR order are decided by the tie rule alone
        # (lower index first, as in the reference); a different rule changes the output.
        for layer in model.moe_layers().values():
            for p in layer.router.parameters():
                torch.nn.init.zeros_(p)
    k = batch_multiple(model)
    export_onnx(model, tmp_path / "model.onnx", _images(k))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    for groups in (1, 3):
        x = _images(groups * k, seed=groups)
        (got,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            want = model(x)
        if "C0.5" in case:
            assert _dropped(model) > 0.05
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-5)
