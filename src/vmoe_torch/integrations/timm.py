"""Registers every vmoe-torch architecture in timm's model registry.

`import vmoe_torch` calls `register()` when timm is installed; then
`timm.create_model("vmoe_s32_last2_e8_k2", num_classes=10, img_size=64,
drop_path_rate=0.1, features_only=True, ...)` builds our models with timm's
keyword arguments. Names (see `timm_names()`):

- presets: `vmoe_<size><patch>_<placement>_e<E>_k<K>` (V-MoE),
  `vmoe_eee_<...>_m<M>` (E^3), `vmoe_soft_<...>` (Soft MoE),
  `vmoe_dense_<size><patch>` (the dense twins);
- released checkpoints: their registry names (`vmoe_b16_imagenet21k_randaug_strong`,
  `eee_s32_last2_ilsvrc2012`, ...), with the checkpoint's classes and resolution.

`pretrained=True` loads local files only: pass
`pretrained_cfg_overlay={"file": PATH}` where PATH is a converted /
`save_pretrained` directory or its `model.safetensors`. Nothing is fetched.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch

from ..config.catalogue import CATALOGUE, override_config
from ..config.model import ModelConfig
from ..models.timm_contract import POOLS, default_pretrained_cfg
from ..models.vit_moe import VisionTransformerMoe

# timm keyword -> our config field.
_TIMM_KWARGS = {"img_size": "image_size", "drop_rate": "dropout_rate", "attn_drop_rate": "attention_dropout_rate",
                "drop_path_rate": "drop_path_rate", "dynamic_img_size": "dynamic_img_size",
                "num_classes": "num_classes", "in_chans": "in_chans", "global_pool": "classifier"}
_registered: dict[str, Callable[[], ModelConfig]] = {}


def _released() -> dict[str, Callable[[], ModelConfig]]:
    from ..convert.reference_config import config_from_reference
    from ..convert.released import RELEASED, released_config
    def builder(name: str) -> Callable[[], ModelConfig]:
        return lambda: config_from_reference(released_config(name))
    return {name: builder(name) for name, entry in RELEASED.items() if entry.supported}


def _sources() -> dict[str, tuple[str, Callable[[], ModelConfig], ModelConfig]]:
    """{timm name: (our name, config builder, its config)}, each config built once."""
    out = {}
    for name, preset in CATALOGUE.items():
        out[name] = (name, preset.config, preset.config())
    for name, build in _released().items():
        out[name] = (name, build, build())
    return dict(sorted(out.items()))


def timm_names() -> dict[str, str]:
    """{timm name: our catalogue or released-checkpoint name} (the same names)."""
    return {timm_name: ours for timm_name, (ours, _, _) in _sources().items()}


def _config_for(base: ModelConfig, kwargs: dict[str, Any]) -> ModelConfig:
    overrides: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "global_pool":
            if value is None:
                continue
            if value not in POOLS:
                raise ValueError(f"global_pool={value!r} is not supported: use one of {sorted(POOLS)}.")
            value = POOLS[value]
        overrides[_TIMM_KWARGS.get(key, key)] = value
    if overrides.get("classifier", base.classifier) != "gap" and base.norm_after_pool:
        overrides["norm_after_pool"] = False
    return override_config(base, **overrides)


def _local_file(overlay: dict[str, Any]) -> dict[str, Any]:
    path = overlay.get("file")
    if path and os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"pretrained file {path!r} not found (pretrained_cfg_overlay['file']).")
    return {**overlay, "file": path} if path else overlay


def _entry(timm_name: str, base: Callable[[], ModelConfig]) -> Callable[..., Any]:
    def create(pretrained: bool = False, **kwargs: Any) -> Any:
        from timm.models import build_model_with_cfg
        overlay = _local_file(dict(kwargs.pop("pretrained_cfg_overlay", None) or {}))
        pretrained_cfg = kwargs.pop("pretrained_cfg", None)
        if pretrained and not overlay.get("file"):
            raise ValueError(f"{timm_name}: pretrained=True needs local weights; nothing is downloaded. "
                             "Pass pretrained_cfg_overlay={'file': DIR} with DIR a converted or "
                             "save_pretrained directory (or its model.safetensors).")
        timm_only = {k: kwargs.pop(k) for k in ("features_only", "out_indices", "feature_cls", "cache_dir")
                     if k in kwargs}

        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)

        def build(**model_kwargs: Any) -> VisionTransformerMoe:
            config = _config_for(base(), model_kwargs)  # bad keywords fail before any allocation
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = VisionTransformerMoe(config)
            return model.to(dtype=dtype) if dtype is not None else model
        model = build_model_with_cfg(build, timm_name, pretrained, pretrained_cfg=pretrained_cfg,
                                     pretrained_cfg_overlay=overlay or None,
                                     feature_cfg={"feature_cls": "getter", "out_indices": 3},
                                     **timm_only, **kwargs)
        if isinstance(model, VisionTransformerMoe):  # the input this model takes, not the registry default
            own = default_pretrained_cfg(model.config)
            model.pretrained_cfg = {**model.pretrained_cfg, "input_size": own["input_size"],
                                    "fixed_input_size": own["fixed_input_size"]}
        return model
    create.__name__ = create.__qualname__ = timm_name
    create.__module__ = __name__
    create.__doc__ = f"vmoe-torch model `{timm_name}` (see vmoe_torch.integrations.timm)."
    return create


default_cfgs: dict[str, Any] = {}


def register() -> list[str]:
    """Registers every name of `timm_names()` with timm (idempotent);
    returns the names."""
    from timm.models import generate_default_cfgs, register_model
    todo = {t: src for t, src in _sources().items() if t not in _registered}
    default_cfgs.update(generate_default_cfgs({t: default_pretrained_cfg(cfg) for t, (_, _, cfg) in todo.items()}))
    for timm_name, (_, build, _) in todo.items():
        register_model(_entry(timm_name, build))
        _registered[timm_name] = build
    return sorted(_registered)


def register_on_import(timm_module: Any) -> None:  # noqa: ARG001 - wrapt's post-import hook signature
    """Called once timm is imported (`vmoe_torch.__init__`)."""
    register()


__all__ = ["register", "register_on_import", "timm_names", "default_cfgs"]
