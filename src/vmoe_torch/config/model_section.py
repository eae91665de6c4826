"""The model section of an experiment file: a catalogue name plus changes
written in `ModelConfig`'s own nested shape, and the one path from them to
a validated `ModelConfig`.

    model: {name: NAME, <ModelConfig field>: value, ...,
            moe: {<MoeConfig field>: value, ..., routing: {<RoutingConfig field>: value}}}
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping, Optional

from .catalogue import resolve_config, split_overrides
from .model import ModelConfig, MoeConfig
from .routing import RoutingConfig
from .typed import from_dict, to_dict

DEFAULT_MODEL = "vmoe_mi4_every1_e8_k2"
_MODEL = {f.name for f in dataclasses.fields(ModelConfig)}
_MOE = {f.name for f in dataclasses.fields(MoeConfig)}
_ROUTING = {f.name for f in dataclasses.fields(RoutingConfig)}
# What fine-tuning may change: the architecture is the checkpoint's.
_FINETUNE_HINT = ("fine-tuning takes the architecture from finetune.init; the model section may set only "
                  "routing (model.moe.routing.*), model.moe.group_size and model.head_bias_init")


def model_section(raw: Any) -> tuple[str, dict[str, Any]]:
    """(name, changes) of a file's model section. The earlier form
    `{name, overrides: {flat create_model keywords}}` is read with a
    warning and turned into changes by the catalogue's rules."""
    if raw is None:
        return DEFAULT_MODEL, {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"model must be a mapping (name: ..., and ModelConfig fields), got {raw!r}.")
    changes = {k: v for k, v in raw.items() if k not in ("name", "overrides")}
    name = raw.get("name", DEFAULT_MODEL)
    if not isinstance(name, str):
        raise ValueError(f"model.name must be a catalogue name or a paper description, got {name!r}.")
    old = raw.get("overrides")
    if old:
        if not isinstance(old, Mapping):
            raise ValueError(f"model.overrides must be a mapping, got {old!r}.")
        warnings.warn("model.overrides is replaced by ModelConfig's own fields beside model.name "
                      "(model.patch_size, model.moe.group_size, model.moe.routing.capacity_factor, ...); "
                      "read with the old rules.", DeprecationWarning, stacklevel=3)
        changes = _merge(_nested(dict(old)), changes)
    _check_shape(changes)
    return name, changes


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
    """Flat create_model keywords -> the nested shape (bare names by the
    catalogue's rules: a ModelConfig field first, then MoeConfig, then
    RoutingConfig)."""
    model_kw, moe_kw, routing_kw = split_overrides(flat)
    out: dict[str, Any] = dict(model_kw)
    if moe_kw or routing_kw:
        out["moe"] = {**moe_kw, **({"routing": routing_kw} if routing_kw else {})}
    return out


def _merge(a: dict[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _check_shape(changes: Mapping[str, Any]) -> None:
    """Every key is a field of the section it stands in (with a hint where
    it belongs to another)."""
    for key in changes:
        if key not in _MODEL:
            where = ("model.moe.routing." if key in _ROUTING else "model.moe." if key in _MOE else None)
            hint = f"; it belongs at {where}{key}" if where else f"; ModelConfig fields: {sorted(_MODEL)}"
            raise ValueError(f"model.{key} is not a ModelConfig field{hint}.")
    moe = changes.get("moe")
    if moe is None:
        return
    if not isinstance(moe, Mapping):
        raise ValueError(f"model.moe must be a mapping of MoeConfig fields, got {moe!r}.")
    for key in moe:
        if key not in _MOE:
            hint = f"; it belongs at model.moe.routing.{key}" if key in _ROUTING else f"; fields: {sorted(_MOE)}"
            raise ValueError(f"model.moe.{key} is not a MoeConfig field{hint}.")
    routing = moe.get("routing", {})
    if not isinstance(routing, Mapping):
        raise ValueError(f"model.moe.routing must be a mapping of RoutingConfig fields, got {routing!r}.")
    unknown = sorted(set(routing) - _ROUTING)
    if unknown:
        raise ValueError(f"model.moe.routing.{unknown[0]} is not a RoutingConfig field; fields: {sorted(_ROUTING)}.")


def create_kwargs(changes: Mapping[str, Any]) -> dict[str, Any]:
    """`changes` as `create_model` / `override_config` keywords, every
    section named: ModelConfig fields flat, `moe={...}`, `routing={...}`."""
    kwargs = {k: v for k, v in changes.items() if k != "moe"}
    moe = dict(changes.get("moe") or {})
    routing = dict(moe.pop("routing", None) or {})
    if moe:
        kwargs["moe"] = moe
    if routing:
        kwargs["routing"] = routing
    return kwargs


def resolve_model(name: str, changes: Mapping[str, Any], image_size: Optional[int] = None,
                  num_classes: Optional[int] = None) -> ModelConfig:
    """The one path from a model section to a validated ModelConfig: the
    catalogue entry, the data's image size and class count, then the
    changes, by the catalogue's override rules (`override_config`), each
    value type-checked by the typed loader and the whole by `validate`."""
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if image_size is not None:
        kwargs["image_size"] = image_size
    cfg = resolve_config(name, **{**kwargs, **create_kwargs(changes)})
    return from_dict(ModelConfig, to_dict(cfg))  # every value's type, checked where it is defined


def finetune_changes(changes: Mapping[str, Any]) -> tuple[dict[str, Any], Optional[float]]:
    """(routing changes with group_size, for `set_routing`; head_bias_init)."""
    extra = sorted(k for k in changes if k not in ("moe", "head_bias_init"))
    moe = dict(changes.get("moe") or {})
    extra += [f"moe.{k}" for k in moe if k not in ("routing", "group_size")]
    if extra:
        raise ValueError(f"{_FINETUNE_HINT}; got model.{', model.'.join(extra)}.")
    routing = dict(moe.get("routing") or {})
    if "group_size" in moe:
        routing["group_size"] = moe["group_size"]
    return routing, changes.get("head_bias_init")
