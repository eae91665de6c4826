"""The catalogue of named model configs (presets) and the override rules
that `create_model`, timm and experiment files share."""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from .descriptions import parse_description
from .model import ModelConfig, MoeConfig, as_pair
from .routing import RoutingConfig


@dataclass(frozen=True)
class Preset:
    """One catalogue entry: a paper description (`parse_description`, with
    its class count and image size) and overrides (`override_config`)."""

    description: str
    num_classes: int = 1000
    image_size: Optional[int] = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def config(self) -> ModelConfig:
        cfg = parse_description(self.description, self.num_classes, self.image_size)
        return override_config(cfg, self.description, **self.overrides) if self.overrides else cfg


# CPU-sized presets: 32x32 images, patch 4 (64 tokens + class token), no
# representation layer, fp32 dispatch (the bf16 rounding only costs time on
# CPUs), aux loss weight 0.01 each.
_TINY_DENSE: dict[str, Any] = dict(representation_size=None)
_TINY = dict(_TINY_DENSE, bfloat16_dispatch=False, importance_loss_weight=0.01, load_loss_weight=0.01)


def _tiny(description: str, overrides: Mapping[str, Any]) -> Preset:
    return Preset(description, num_classes=10, image_size=32, overrides=overrides)


# The one catalogue: every named model has this one name, here, in timm's
# registry and in experiment files.
CATALOGUE: dict[str, Preset] = {}
# The paper's V-MoE backbones (E=8, K=2 as the released checkpoints) and their dense twins.
for _size, _patch in (("S", 32), ("B", 32), ("B", 16), ("L", 32), ("L", 16), ("H", 14)):
    _tag = f"{_size.lower()}{_patch}"
    CATALOGUE[f"vmoe_dense_{_tag}"] = Preset(f"ViT-{_size}/{_patch}")
    CATALOGUE[f"vmoe_{_tag}_every2_e8_k2"] = Preset(f"V-MoE-{_size}/{_patch}, E=8, K=2, Every 2")
    CATALOGUE[f"vmoe_{_tag}_last2_e8_k2"] = Preset(f"V-MoE-{_size}/{_patch}, E=8, K=2, Last 2")
CATALOGUE["vmoe_dense_ti16"] = Preset("ViT-Ti/16")
CATALOGUE.update({
    "vmoe_dense_mi4": _tiny("ViT-Mi/4", _TINY_DENSE),
    "vmoe_mi4_every1_e8_k2": _tiny("V-MoE-Mi/4, E=8, K=2, Every 1", _TINY),
    "vmoe_mi4_every2_e8_k2": _tiny("V-MoE-Mi/4, E=8, K=2, Every 2", _TINY),
    "vmoe_dense_ti4": _tiny("ViT-Ti/4", _TINY_DENSE),
    "vmoe_ti4_every2_e8_k2": _tiny("V-MoE-Ti/4, E=8, K=2, Every 2", _TINY),
    # Soft MoE paper models: 128 experts of one slot each (128 slots for 196 tokens).
    "vmoe_soft_s16_128e": Preset("Soft MoE-S/16, E=128, p=1"),
    "vmoe_soft_b16_128e": Preset("Soft MoE-B/16, E=128, p=1"),
    "vmoe_soft_l16_128e": Preset("Soft MoE-L/16, E=128, p=1"),
    "vmoe_soft_mi4_half": _tiny("Soft MoE-Mi/4, E=8, p=2", {"qk_norm": False}),
    # E^3 (the released eee_s32_last2 architecture) and a tiny one.
    "vmoe_eee_s32_last2_e8_k1_m2": Preset("V-MoE-S/32, E=8, K=1, M=2, Last 2"),
    "vmoe_eee_mi4_every2_e8_k1_m2": _tiny("V-MoE-Mi/4, E=8, K=1, M=2, Every 2", _TINY),
})
# Names of earlier versions, still accepted (with a warning) by `resolve_config`.
RENAMED: dict[str, str] = {
    **{f"vit_{t}": f"vmoe_dense_{t}" for t in ("s32", "b32", "b16", "l32", "l16", "h14", "ti16", "mi4", "ti4")},
    **{f"vmoe_{t}_{p}": f"vmoe_{t}_{p}_e8_k2" for t in ("s32", "b32", "b16", "l32", "l16", "h14")
       for p in ("every2", "last2")},
    "vmoe_mi4_every1": "vmoe_mi4_every1_e8_k2", "vmoe_mi4_every2": "vmoe_mi4_every2_e8_k2",
    "vmoe_ti4_every2": "vmoe_ti4_every2_e8_k2",
    **{f"soft_moe_{s}16_128e": f"vmoe_soft_{s}16_128e" for s in ("s", "b", "l")},
    "soft_moe_mi4_half": "vmoe_soft_mi4_half",
    "eee_s32_last2": "vmoe_eee_s32_last2_e8_k1_m2", "eee_mi4_every2": "vmoe_eee_mi4_every2_e8_k1_m2",
}


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_MOE_FIELDS = {f.name for f in dataclasses.fields(MoeConfig)} - {"routing"}
_ROUTING_FIELDS = {f.name for f in dataclasses.fields(RoutingConfig)}


def list_models() -> list[str]:
    return sorted(CATALOGUE)


def _images_per_group(cfg: ModelConfig) -> int:
    """Images per routing group of a preset (8, the paper's, when unknown)."""
    if cfg.moe is None or cfg.moe.group_size is None:
        return 8
    per_image = cfg.tokens_per_image * cfg.moe.ensemble_size
    return cfg.moe.group_size // per_image if cfg.moe.group_size % per_image == 0 else 8


class UnknownOverrideError(TypeError, ValueError):
    """An override names no model, MoE or routing field. A TypeError like any
    unexpected keyword argument (timm's model contract), and a ValueError
    like every other bad setting."""


def split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Model / MoE / routing overrides. `moe={...}` and `routing={...}` name
    their section explicitly; a bare name is taken by the first section that
    has it, in that order (so `mlp_dim` is the model's, `moe={"mlp_dim": 256}`
    the experts')."""
    model_kw: dict[str, Any] = {}
    moe_kw: dict[str, Any] = {}
    routing_kw: dict[str, Any] = {}
    for section, fields, target in (("moe", _MOE_FIELDS, moe_kw), ("routing", _ROUTING_FIELDS, routing_kw)):
        value = overrides.get(section)
        if isinstance(value, dict):
            unknown = sorted(set(value) - fields)
            if unknown:
                raise UnknownOverrideError(f"Unknown {section} override(s) {unknown}; valid: {sorted(fields)}.")
            target.update(value)
    unknown = []
    for key, value in overrides.items():
        if key in ("moe", "routing") and isinstance(value, dict):
            continue
        if key in _MODEL_FIELDS:
            model_kw[key] = value
        elif key in _MOE_FIELDS:
            moe_kw[key] = value
        elif key in _ROUTING_FIELDS:
            routing_kw[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise UnknownOverrideError(f"Unknown override(s) {sorted(unknown)} for create_model; valid: model fields "
                         f"{sorted(_MODEL_FIELDS)}, MoE fields {sorted(_MOE_FIELDS)} (or moe={{...}}), "
                         f"routing fields {sorted(_ROUTING_FIELDS)} (or routing={{...}}).")
    return model_kw, moe_kw, routing_kw


def resolve_config(name: str, **overrides: Any) -> ModelConfig:
    """Config of a preset name or paper description with overrides applied.

    Overrides may name any ModelConfig field (num_classes, image_size, ...),
    any MoeConfig field (num_experts, group_size, layers, ensemble_size) or
    any routing field (num_selected_experts, capacity_factor, router, ...).
    Names shared by two sections (mlp_dim, dropout_rate) are the model's;
    pass `moe={"mlp_dim": 256}` for the experts'.
    """
    if name in RENAMED:
        warnings.warn(f"Model name {name!r} is now {RENAMED[name]!r}; the old name will be removed.",
                      DeprecationWarning, stacklevel=2)
        name = RENAMED[name]
    if name in CATALOGUE:
        cfg = CATALOGUE[name].config()
    elif "/" in name:
        cfg = parse_description(name)
    else:
        raise ValueError(f"Unknown model {name!r}. Known presets: {list_models()}, or a paper "
                         "description such as 'ViT-S/32, E=8, K=2, Last 2'.")
    return override_config(cfg, name, **overrides)


def override_config(cfg: ModelConfig, name: str = "this model", **overrides: Any) -> ModelConfig:
    """`cfg` with overrides applied by `resolve_config`'s rules (validated)."""
    model_kw, moe_kw, routing_kw = split_overrides(overrides)
    for key in ("image_size", "patch_size"):
        if key in model_kw:
            model_kw[key] = as_pair(model_kw[key])
    if "num_classes" in model_kw and "head_bias_init" not in model_kw and cfg.head_bias_init:
        n = model_kw["num_classes"]
        model_kw["head_bias_init"] = -math.log(n) if n > 1 else 0.0
    if (moe_kw or routing_kw) and cfg.moe is None and "moe" not in model_kw:
        raise ValueError(f"{name!r} is a dense model: MoE/routing overrides "
                         f"{sorted(moe_kw) + sorted(routing_kw)} do not apply.")
    images = _images_per_group(cfg)
    cfg = dataclasses.replace(cfg, **model_kw)
    if cfg.moe is not None and (moe_kw or routing_kw or "image_size" in model_kw):
        if "layers" in moe_kw:
            moe_kw["layers"] = tuple(moe_kw["layers"])
        routing = cfg.moe.routing.updated(**routing_kw)
        if "group_size" not in moe_kw and "image_size" in model_kw:
            # Keep the number of images per routing group at the new resolution.
            moe_kw["group_size"] = images * cfg.tokens_per_image * cfg.moe.ensemble_size
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, routing=routing, **moe_kw))
    cfg.validate()
    return cfg

