"""`timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": DIR})`
with DIR a `save_pretrained` directory (or its model.safetensors): the same
checks as `from_pretrained`, through timm's keyword arguments.

The saved config.json is the truth about the weights. timm's keywords may
change what can change without new weights: `num_classes` (a new head, as
timm adapts heads), `img_size` (the position embedding is resampled), the
dropout / drop-path rates, `dynamic_img_size`, and routing settings. A
keyword or a preset whose architecture differs from the saved one (GELU, eps,
pooling, width...) is refused, naming every difference, instead of loading
weights into a model that computes something else.

The name `vmoe_pretrained` takes its whole architecture from DIR, so any
saved model (an upcycled DeiT, a fine-tuned E^3, ...) loads through timm
with no registered name of its own.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from ..config.model import ModelConfig
from ..config.typed import to_dict
from ..models.vit_moe import VisionTransformerMoe
from ..storage import pretrained as files
from .timm_kwargs import config_for

GENERIC = "vmoe_pretrained"
# Settings that are not part of what the weights compute.
_FREE = {"num_classes", "image_size", "head_bias_init", "head_kernel_zero_init", "dropout_rate",
         "attention_dropout_rate", "drop_path_rate", "dynamic_img_size", "check_finite"}
_FREE_MOE = {"routing", "layer_routing", "group_size", "dropout_rate"}


def pretrained_dir(file: str) -> Optional[str]:
    """The save_pretrained directory `file` names (itself, or the folder of
    its model.safetensors); None for another kind of file."""
    folder = file if os.path.isdir(file) else os.path.dirname(file)
    meta = os.path.join(folder, "config.json")
    if not os.path.exists(meta):
        return None
    import json
    try:
        with open(meta) as f:
            return folder if json.load(f).get("format") == files.FORMAT else None
    except (json.JSONDecodeError, AttributeError):
        return None


def _flat(cfg: ModelConfig) -> dict[str, Any]:
    data = {k: v for k, v in to_dict(cfg).items() if k not in _FREE and k != "moe"}
    moe = to_dict(cfg).get("moe")
    if moe:
        data.update({f"moe.{k}": v for k, v in moe.items() if k not in _FREE_MOE})
    else:
        data["moe"] = None
    return data


def architecture_diff(saved: ModelConfig, requested: ModelConfig) -> list[str]:
    """Every architecture field where `requested` differs from `saved`."""
    a, b = _flat(saved), _flat(requested)
    return [f"{k}: saved {a.get(k)!r}, requested {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def build_from_dir(name: str, base: Optional[ModelConfig], folder: str, kwargs: dict[str, Any]
                   ) -> VisionTransformerMoe:
    """The model of `folder` with timm's `kwargs` applied; `base` is the
    preset `name` builds (None for `vmoe_pretrained`)."""
    saved = files.read_config(folder)
    hint = (f" Load it with timm.create_model('{GENERIC}', pretrained=True, pretrained_cfg_overlay="
            f"{{'file': {folder!r}}}) (the architecture comes from the directory), or drop the keyword.")
    if base is not None:
        diff = architecture_diff(saved, config_for(base, kwargs))
        if diff:
            raise ValueError(f"{name} does not build the model saved in {folder!r}: {'; '.join(diff)}."
                             + hint)
    wanted = config_for(saved, kwargs)
    diff = architecture_diff(saved, wanted)
    if diff:
        raise ValueError(f"Keyword arguments {sorted(kwargs)} change the architecture the weights in "
                         f"{folder!r} were trained with: {'; '.join(diff)}. Leave them out.")
    import dataclasses
    model = VisionTransformerMoe(dataclasses.replace(wanted, num_classes=saved.num_classes,
                                                     image_size=saved.image_size,
                                                     head_bias_init=saved.head_bias_init))
    state = files.read_weights(folder)
    files.check_state(model, state)
    files.check_fingerprint(folder, saved)
    model.load_state_dict(state, strict=True)
    if wanted.num_classes != saved.num_classes:
        model.reset_classifier(wanted.num_classes)
    if wanted.image_size != saved.image_size:
        model.set_input_size(img_size=wanted.image_size)
    return model
