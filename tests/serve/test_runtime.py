"""The serving runtimes: exported programs (one per routing setting, whole
routing groups through the program, the rest eager) give the eager model's
outputs, and `auto` measures both and reports what it chose."""
from __future__ import annotations

import pytest
import torch

from vmoe_torch import create_model
from vmoe_torch.serve.runtime import Eager, Exported, choose_runtime
from vmoe_torch.storage.calibration import Calibration, Point

OWN = {"num_selected_experts": 2, "capacity_factor": 1.05, "batch_priority": False, "dropless": False}
CHEAP = {"num_selected_experts": 1, "capacity_factor": 0.5, "batch_priority": True, "dropless": False}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create_model("vmoe_mi4_every2_e8_k2", num_classes=10).eval()
    torch.nn.init.normal_(m.head.weight)
    m.calibration = Calibration([Point(OWN, 0.8, 100.0), Point(CHEAP, 0.7, 50.0)], reference=0)
    return m


@pytest.mark.slow
def test_exported_equals_eager_per_routing_setting_and_batch_size(model):
    """8 images fill whole groups here; 20 = 16 through the program + a
    4-image last group eagerly, as the eager model groups them. Each budget
    gets its own program (the routing is fixed when exporting); the same
    kernels run, so the tolerance is a few float32 roundings of O(1) logits."""
    exported = Exported(model)
    assert exported.multiple == 8
    x = torch.randn(20, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for key, budget in (("", None), ('{"relative": 0.6}', {"relative": 0.6})):
            for n in (3, 8, 20):
                if budget:
                    with model.at_budget(**budget):
                        want, got = model(x[:n]), exported(key, x[:n])
                else:
                    want, got = model(x[:n]), exported(key, x[:n])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sorted(exported.programs) == ['', '{"relative": 0.6}']
    # the programs differ: the cheap routing drops tokens the own routing keeps
    with torch.no_grad():
        assert not torch.allclose(exported.programs[""](x[:8]), exported.programs['{"relative": 0.6}'](x[:8]))


def test_choose_runtime_reports_what_it_measured(model):
    runtime, report = choose_runtime(model, "eager", 8)
    assert isinstance(runtime, Eager) and report["reason"] == "requested"
    runtime, report = choose_runtime(model, "auto", 4)  # 4 images fill no whole group of 8
    assert isinstance(runtime, Eager) and "no whole routing groups" in report["reason"]
    with pytest.raises(ValueError, match="Unknown runtime"):
        choose_runtime(model, "fast", 8)


@pytest.mark.slow
def test_auto_measures_both_and_keeps_the_faster(model):
    runtime, report = choose_runtime(model, "auto", 8, repeats=1)
    ms = report["ms_per_batch"]
    assert set(ms) == {"eager", "exported"} and all(v > 0 for v in ms.values())
    assert report["runtime"] == runtime.name == min(ms, key=ms.get)


def test_a_whole_batch_group_cannot_be_exported_and_says_so():
    m = create_model("vmoe_mi4_every2_e8_k2", num_classes=10, group_size=None).eval()
    runtime, report = choose_runtime(m, "auto", 8)
    assert isinstance(runtime, Eager) and "not exportable" in report["reason"]
    with pytest.raises(ValueError, match="--runtime exported is not possible"):
        choose_runtime(m, "exported", 8)
