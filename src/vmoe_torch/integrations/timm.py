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
Its config.json is checked against the preset and the keywords as
`from_pretrained` checks it (`timm_pretrained`); the name `vmoe_pretrained`
takes the whole architecture from PATH (any saved model, upcycled ones
included: `train.py --model vmoe_pretrained --pretrained --pretrained-path DIR`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Optional

import torch

from ..config.catalogue import CATALOGUE
from ..config.model import ModelConfig
from ..models.timm_contract import default_pretrained_cfg
from ..models.vit_moe import VisionTransformerMoe
from ..storage.pretrained import read_config
from .timm_kwargs import config_for
from .timm_pretrained import GENERIC, build_from_dir, pretrained_dir

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


def _local_file(overlay: dict[str, Any]) -> dict[str, Any]:
    path = overlay.get("file")
    if path and os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"pretrained file {path!r} not found (pretrained_cfg_overlay['file']).")
    return {**overlay, "file": path} if path else overlay


# A run-time setting, not architecture: the factor of the auxiliary-loss
# gradient the training logits carry (`set_auxiliary_loss_gradient`), for
# scripts whose only door is a keyword (train.py --model-kwargs): 1/N under
# --grad-accum-steps N, 0 to switch the attachment off.
AUX_SCALE_KWARG = "auxiliary_loss_gradient_scale"


def _set_aux_gradient_scale(model: Any, timm_name: str, scale: Any) -> None:
    inner = getattr(model, "model", model)  # timm's feature wrappers hold the model
    if not isinstance(inner, VisionTransformerMoe):
        raise TypeError(f"{timm_name}: {AUX_SCALE_KWARG} applies to vmoe-torch models, not "
                        f"{type(inner).__name__}.")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale < float("inf"):
        raise ValueError(f"{timm_name}: {AUX_SCALE_KWARG} must be a finite number >= 0 (1/N under gradient "
                         f"accumulation over N micro-batches, 0 to switch the attachment off), got {scale!r}.")
    inner.set_auxiliary_loss_gradient(attached=scale > 0, scale=float(scale) if scale > 0 else 1.0)


def _entry(timm_name: str, base: Optional[Callable[[], ModelConfig]]) -> Callable[..., Any]:
    """timm's entry point for `timm_name`; `base` builds its preset config
    (None: `vmoe_pretrained`, whose architecture comes from the file)."""
    def create(pretrained: bool = False, **kwargs: Any) -> Any:
        from timm.models import build_model_with_cfg
        overlay = _local_file(dict(kwargs.pop("pretrained_cfg_overlay", None) or {}))
        pretrained_cfg = kwargs.pop("pretrained_cfg", None)
        if base is None and not overlay.get("file"):
            raise ValueError(f"{timm_name} takes its architecture and weights from a save_pretrained "
                             "directory's config.json and model.safetensors: pass pretrained=True, "
                             "pretrained_cfg_overlay={'file': DIR}.")
        if pretrained and not overlay.get("file"):
            raise ValueError(f"{timm_name}: pretrained=True needs local weights; nothing is downloaded. "
                             "Pass pretrained=True, pretrained_cfg_overlay={'file': DIR} with DIR a "
                             "converted or save_pretrained directory (or its model.safetensors).")
        folder = pretrained_dir(overlay["file"]) if overlay.get("file") and (pretrained or base is None) else None
        if base is None and folder is None:
            raise ValueError(f"{timm_name} reads its architecture from a save_pretrained directory's "
                             f"config.json; {overlay.get('file')!r} has none beside it.")
        known = read_config(folder) if folder is not None else base()  # type: ignore[misc]
        if folder is not None:  # timm fills num_classes / img_size from the pretrained_cfg: the file's
            overlay = {**default_pretrained_cfg(known), **overlay}
        timm_only = {k: kwargs.pop(k) for k in ("features_only", "out_indices", "feature_cls", "cache_dir")
                     if k in kwargs}

        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        aux_scale = kwargs.pop(AUX_SCALE_KWARG, None)

        def build(**model_kwargs: Any) -> VisionTransformerMoe:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                if folder is not None:  # our directory: its config.json, checked (timm_pretrained)
                    model = build_from_dir(timm_name, base() if base else None, folder, model_kwargs)
                else:
                    model = VisionTransformerMoe(config_for(base(), model_kwargs))  # type: ignore[misc]
            return model.to(dtype=dtype) if dtype is not None else model
        model = build_model_with_cfg(build, timm_name, pretrained and folder is None,
                                     pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=overlay or None,
                                     feature_cfg={"feature_cls": "getter", "out_indices": min(3, known.num_layers)},
                                     **timm_only, **kwargs)
        if aux_scale is not None:
            _set_aux_gradient_scale(model, timm_name, aux_scale)
        if isinstance(model, VisionTransformerMoe):  # the input this model takes, not the registry default
            own = default_pretrained_cfg(model.config)
            keep = {"input_size", "fixed_input_size"} if base is not None else set(own)
            model.pretrained_cfg = {**model.pretrained_cfg, **{k: own[k] for k in keep}}
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
    if GENERIC not in _registered:
        any_cfg = next(iter(CATALOGUE.values())).config()
        default_cfgs.update(generate_default_cfgs({GENERIC: default_pretrained_cfg(any_cfg)}))
        register_model(_entry(GENERIC, None))
        _registered[GENERIC] = lambda: any_cfg
    return sorted(_registered)


def register_on_import(timm_module: Any) -> None:  # noqa: ARG001 - wrapt's post-import hook signature
    """Called once timm is imported (`vmoe_torch.__init__`)."""
    register()


__all__ = ["register", "register_on_import", "timm_names", "default_cfgs"]
