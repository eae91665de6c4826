"""The catalogue of named model configs (presets) and the override rules
that `create_model`, timm and experiment files share."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from .descriptions import VIT_BACKBONES, parse_description, second_half
from .model import ModelConfig, MoeConfig, as_pair
from .routing import RoutingConfig

PRESETS: dict[str, Callable[[], ModelConfig]] = {}

# CPU-sized presets: no representation layer, fp32 dispatch (the bf16 rounding
# only costs time on CPUs), aux loss weight 0.01 each.
_TINY: dict[str, Any] = dict(representation_size=None)
_TINY_ROUTING: dict[str, Any] = dict(bfloat16_dispatch=False, importance_loss_weight=0.01, load_loss_weight=0.01)


def register(name: str, description: str, tiny: bool = False, **kw: Any) -> None:
    def build() -> ModelConfig:
        cfg = parse_description(description, **kw)
        if not tiny:
            return cfg
        cfg = dataclasses.replace(cfg, **_TINY)
        if cfg.moe is not None:
            cfg = dataclasses.replace(cfg, moe=dataclasses.replace(
                cfg.moe, routing=cfg.moe.routing.updated(**_TINY_ROUTING)))
        return cfg
    PRESETS[name] = build


# The paper's V-MoE backbones (E=8, K=2 as the released checkpoints) and their dense twins.
for _size, _patch in (("S", 32), ("B", 32), ("B", 16), ("L", 32), ("L", 16), ("H", 14)):
    _tag = f"{_size.lower()}{_patch}"
    register(f"vit_{_tag}", f"ViT-{_size}/{_patch}")
    register(f"vmoe_{_tag}_every2", f"V-MoE-{_size}/{_patch}, E=8, K=2, Every 2")
    register(f"vmoe_{_tag}_last2", f"V-MoE-{_size}/{_patch}, E=8, K=2, Last 2")
register("vit_ti16", "ViT-Ti/16")
# Tiny CPU presets: 32x32 images, patch 4 (64 tokens + class token).
register("vit_mi4", "ViT-Mi/4", tiny=True, num_classes=10, image_size=32)
register("vmoe_mi4_every1", "V-MoE-Mi/4, E=8, K=2, Every 1", tiny=True, num_classes=10, image_size=32)
register("vmoe_mi4_every2", "V-MoE-Mi/4, E=8, K=2, Every 2", tiny=True, num_classes=10, image_size=32)
register("vit_ti4", "ViT-Ti/4", tiny=True, num_classes=10, image_size=32)
register("vmoe_ti4_every2", "V-MoE-Ti/4, E=8, K=2, Every 2", tiny=True, num_classes=10, image_size=32)



def soft_moe_config(size: str, patch: int, num_experts: int, num_slots: int,
                    image_size: int = 224, num_classes: int = 1000) -> ModelConfig:
    """A Soft MoE model as in the paper (arXiv 2308.00951) and the reference's
    soft_moe configs: ViT backbone of "Scaling ViT" sizes, GAP head, qk-norm,
    MoE in every block of the second half, one image per routing group."""
    bb = VIT_BACKBONES[size]
    tokens = (image_size // patch) ** 2
    routing = RoutingConfig(router="soft", num_slots=num_slots, capacity_factor=None)
    moe = MoeConfig(layers=second_half(bb.num_layers), num_experts=num_experts, group_size=tokens,
                    routing=routing)
    return ModelConfig(num_classes=num_classes, image_size=(image_size, image_size),
                       patch_size=(patch, patch), hidden_size=bb.hidden_size,
                       num_layers=bb.num_layers, num_heads=bb.num_heads, mlp_dim=bb.mlp_dim,
                       classifier="gap", head_bias_init=-math.log(num_classes), moe=moe,
                       qk_norm=True)


# Soft MoE paper models: 128 experts of one slot each (128 slots for 196 tokens).
def _soft_preset(size: str) -> Callable[[], ModelConfig]:
    return lambda: soft_moe_config(size, 16, num_experts=128, num_slots=1)


for _size in ("S", "B", "L"):
    PRESETS[f"soft_moe_{_size.lower()}16_128e"] = _soft_preset(_size)
PRESETS["soft_moe_mi4_half"] = lambda: dataclasses.replace(
    parse_description("V-MoE-Mi/4, E=8, K=1, Second half", num_classes=10, image_size=32),
    representation_size=None, classifier="gap", moe=MoeConfig(
        layers=second_half(6), num_experts=8, group_size=64,
        routing=RoutingConfig(router="soft", num_slots=2, capacity_factor=None)))
# E^3 (the released eee_s32_last2 architecture) and a tiny one.
register("eee_s32_last2", "V-MoE-S/32, E=8, K=1, M=2, Last 2")
register("eee_mi4_every2", "V-MoE-Mi/4, E=8, K=1, M=2, Every 2", tiny=True, num_classes=10, image_size=32)

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_MOE_FIELDS = {f.name for f in dataclasses.fields(MoeConfig)} - {"routing"}
_ROUTING_FIELDS = {f.name for f in dataclasses.fields(RoutingConfig)}


def list_models() -> list[str]:
    return sorted(PRESETS)


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


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
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
    if name in PRESETS:
        cfg = PRESETS[name]()
    elif "/" in name:
        cfg = parse_description(name)
    else:
        raise ValueError(f"Unknown model {name!r}. Known presets: {list_models()}, or a paper "
                         "description such as 'ViT-S/32, E=8, K=2, Last 2'.")
    return override_config(cfg, name, **overrides)


def override_config(cfg: ModelConfig, name: str = "this model", **overrides: Any) -> ModelConfig:
    """`cfg` with overrides applied by `resolve_config`'s rules (validated)."""
    model_kw, moe_kw, routing_kw = _split_overrides(overrides)
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

