"""Typed configs: YAML + dotted overrides, unknown keys rejected."""
from __future__ import annotations

import pytest

from vmoe_torch.config import load_config


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.01\ntrain:\n  steps: 5\n")
    cfg = load_config(str(p), ["optim.lr=1e-3", "model.overrides.num_experts=4", "eval.grid_capacity_factors=[0.5,1]"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 5
    assert cfg.model.overrides == {"num_experts": 4}
    assert cfg.eval.grid_capacity_factors == (0.5, 1.0)


@pytest.mark.parametrize("override,match", [
    ("optim.lrr=1", "optim.lrr"),
    ("trainn.steps=3", "trainn"),
    ("optim.lr=abc", "optim.lr"),
    ("train.steps=0", "train.steps"),
    ("data.name=mnist", "data.name"),
    ("data.name=imagefolder", "data.path"),
    ("data.batch_size=10", "grad_accum"),
])
def test_bad_configs_are_rejected(override, match):
    extra = ["train.grad_accum=4"] if "grad_accum" in match else []
    with pytest.raises(ValueError, match=match):
        load_config(None, [override] + extra)


def test_every_config_file_loads():
    import pathlib
    from vmoe_torch.models import resolve_config
    files = sorted(pathlib.Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        cfg = load_config(str(f), ["data.path=/data"])
        text = f.read_text()
        assert "Command:" in text and "Expected:" in text, f.name
        model_cfg = resolve_config(cfg.model.name, image_size=cfg.data.image_size, **cfg.model.overrides)
        assert model_cfg.image_size == (cfg.data.image_size,) * 2
