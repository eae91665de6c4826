"""timm's model keyword arguments -> our `ModelConfig`."""
from __future__ import annotations

from typing import Any

from ..config.catalogue import override_config
from ..config.model import ModelConfig
from ..models.timm_contract import POOLS

# timm keyword -> our config field.
TIMM_KWARGS = {"img_size": "image_size", "drop_rate": "dropout_rate", "attn_drop_rate": "attention_dropout_rate",
               "drop_path_rate": "drop_path_rate", "dynamic_img_size": "dynamic_img_size",
               "num_classes": "num_classes", "in_chans": "in_chans", "global_pool": "classifier"}


def config_for(base: ModelConfig, kwargs: dict[str, Any]) -> ModelConfig:
    """`base` with timm's keyword arguments applied (validated)."""
    overrides: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key == "global_pool":
            if value is None:
                continue
            if value not in POOLS:
                raise ValueError(f"global_pool={value!r} is not supported: use one of {sorted(POOLS)}.")
            value = POOLS[value]
        overrides[TIMM_KWARGS.get(key, key)] = value
    if overrides.get("classifier", base.classifier) != "gap" and base.norm_after_pool:
        overrides["norm_after_pool"] = False
    return override_config(base, **overrides)
