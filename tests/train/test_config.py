"""Typed configs: YAML + dotted overrides, unknown keys rejected."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmoe_torch.config import load_config


def test_yaml_and_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 0.01\ntrain:\n  steps: 5\n")
    cfg = load_config(str(p), ["optim.lr=1e-3", "model.moe.num_experts=4", "eval.grid_capacity_factors=[0.5,1]"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 5
    assert cfg.model.changes == {"moe": {"num_experts": 4}}
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

    files = sorted(pathlib.Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        cfg = load_config(str(f), ["data.path=/data"])
        text = f.read_text()
        assert "Command:" in text and "Expected:" in text, f.name
        if cfg.finetune.init is None:
            model_cfg = cfg.model.resolve(image_size=cfg.data.image_size)
            assert model_cfg.image_size == (cfg.data.image_size,) * 2


@pytest.mark.parametrize("override,match", [
    ("schedule.name=cosine", "schedule.name: 'cosine' is not one of"),       # a typo of warmup_cosine_decay
    ("data.batch_size=yes", "data.batch_size: expected int, got the boolean"),
    ("train.loss=mse", "train.loss: 'mse' is not one of"),
    ("data.randaugment=[2]", "data.randaugment"),
    ("optim.name=adamm", "optim.name: 'adamm' is not one of"),
    ("train.steps=1.5", "train.steps: expected int"),
    ("train.bf16=1", "train.bf16: expected bool"),
    ("model.moe.routing.capacity_factor=.inf", "capacity_factor must be a finite"),
    ("model.moe.routing.dispatch=foo", "model.moe.routing.dispatch is not a RoutingConfig field"),
    ("model.moe.routing.router=sparse", "Unknown router"),
    ("model.group_size=8", "it belongs at model.moe.group_size"),
    ("model.capacity_factor=2", "it belongs at model.moe.routing.capacity_factor"),
    ("model.moe.capacity_factor=2", "it belongs at model.moe.routing.capacity_factor"),
    ("model.patch_size=[8, 8, 8]", "patch_size"),
    ("model.moe.routing.batch_priority=maybe", "batch_priority"),
    ("model.name=ViT-Q/16", "Cannot parse model description"),
])
def test_enumerated_and_typed_fields_are_checked_at_load(override, match):
    from vmoe_torch.config.typed import ConfigError
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_finetune_changes_are_routing_changes_checked_at_load(tmp_path):
    from vmoe_torch.config.typed import ConfigError
    init = f"finetune.init={tmp_path}"
    cfg = load_config(None, [init, "model.moe.routing.capacity_factor=1.5",
                             "model.moe.group_size=64", "model.head_bias_init=-2.0"])
    assert cfg.model.finetune_changes() == ({"capacity_factor": 1.5, "group_size": 64}, -2.0)
    with pytest.raises(ConfigError, match="not a RoutingConfig field"):
        load_config(None, [init, "model.moe.routing.capacity_factr=1.5"])
    with pytest.raises(ConfigError, match="takes the architecture from finetune.init.*model.patch_size"):
        load_config(None, [init, "model.patch_size=8"])
    with pytest.raises(ConfigError, match="finetune.init '/nothere' does not exist"):
        load_config(None, ["finetune.init=/nothere"])


def test_one_path_from_the_file_to_the_router(tmp_path):
    """model.moe.routing.capacity_factor in a file is the router's setting,
    and the work dir's config.yaml writes the section back in the same shape."""
    import yaml

    from vmoe_torch.config.experiment import config_to_dict
    from vmoe_torch.models import VisionTransformerMoe
    cfg = load_config(None, ["model.moe.routing.capacity_factor=2.0", "model.moe.group_size=130"])
    model = VisionTransformerMoe(cfg.model.resolve(image_size=32, num_classes=10))
    assert all(layer.router.config.capacity_factor == 2.0 and layer.group_size == 130
               for layer in model.moe_layers().values())
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(str(path)).model == cfg.model


def test_the_earlier_flat_overrides_still_load_with_a_warning():
    with pytest.warns(DeprecationWarning, match="model.overrides is replaced"):
        old = load_config(None, ["model.overrides={patch_size: 8, group_size: 34, capacity_factor: 2.0}"])
    new = load_config(None, ["model.patch_size=8", "model.moe.group_size=34", "model.moe.routing.capacity_factor=2.0"])
    assert old.model == new.model and old.model.resolve(32, 10) == new.model.resolve(32, 10)


# -------------------------------------------------------------------- fuzz
def _leaves(cls, prefix=""):
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def _schema_keys():
    from vmoe_torch.config.experiment import ExperimentConfig
    return sorted(_leaves(ExperimentConfig))


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.one_of(st.integers(-2, 50), st.floats(-1, 5), st.text(max_size=4)),
                                   max_size=4),
    st.sampled_from(["digits", "adamw", "sgd", "warmup_cosine_decay", "softmax_xent", "auto", "cpu",
                     "vmoe_mi4_every1_e8_k2", "ViT-S/32, E=8, K=2, Last 2"]),
    st.dictionaries(st.sampled_from(["num_experts", "capacity_factor", "router", "group_size", "foo"]),
                    st.one_of(st.integers(-1, 16), st.floats(-1, 4), st.text(max_size=5)), max_size=3))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_schema_keys()), _VALUES, min_size=1, max_size=4))
def test_fuzzed_configs_load_or_raise_a_clear_config_error(changes):
    """Random types and values for every field: either a valid config or a
    ConfigError that names a key; never another exception."""
    from vmoe_torch.config.experiment import ExperimentConfig, _set_dotted, from_dict, validate
    from vmoe_torch.config.typed import ConfigError
    data: dict = {}
    for key, value in changes.items():
        _set_dotted(data, key, value)
    try:
        cfg = from_dict(ExperimentConfig, data)
        validate(cfg)
    except ConfigError as e:
        assert str(e)
        return
    assert cfg.train.steps >= 1 and cfg.data.batch_size >= 1


def test_zero_grad_accum_is_a_config_error_not_a_division_by_zero():
    from vmoe_torch.config import load_config
    from vmoe_torch.config.experiment import ConfigError
    with pytest.raises(ConfigError, match="grad_accum must be >= 1"):
        load_config(None, ["train.grad_accum=0"])
