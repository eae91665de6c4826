"""Reference (vmoe native) checkpoints <-> VisionTransformerMoe."""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np

from ..models.config import ModelConfig
from ..models.vit_moe import VisionTransformerMoe
from .mapping import reference_to_torch, torch_to_reference
from .native import read_reference_checkpoint, write_reference_checkpoint
from .pretrained import load_state_strict
from .reference_config import config_from_reference, config_to_reference


def load_reference_config(path: str) -> dict[str, Any]:
    """Reads a fixture-style config.json (with `constructor_kwargs`) or a
    plain kwargs JSON."""
    with open(path) as f:
        data = json.load(f)
    return data.get("constructor_kwargs", data)


def model_from_params(params: Mapping[str, np.ndarray], model_config: Mapping[str, Any],
                      image_size: Optional[int | tuple[int, int]] = None) -> VisionTransformerMoe:
    cfg = config_from_reference(model_config, params, image_size)
    model = VisionTransformerMoe(cfg)
    try:
        load_state_strict(model, reference_to_torch(dict(params)))
    except ValueError as e:
        raise ValueError(f"The checkpoint does not match the given config: {e}") from e
    return model.eval()


def model_from_reference(prefix: str, model_config: Mapping[str, Any],
                         image_size: Optional[int | tuple[int, int]] = None) -> VisionTransformerMoe:
    """Reads a native checkpoint and builds the model it belongs to (eval mode).

    Args:
      prefix: checkpoint prefix (`<prefix>.index`, `<prefix>.data-*`).
      model_config: the reference constructor kwargs.
      image_size: the resolution the learned position embedding is for;
        inferred from the checkpoint when omitted. To run at another size,
        call `model.resize_pos_embed(size)` afterwards.
    """
    return model_from_params(read_reference_checkpoint(prefix), model_config, image_size)


def model_to_reference(model: VisionTransformerMoe, prefix: str, num_shards: int = 1,
                       max_chunk_bytes: Optional[int] = None) -> dict[str, Any]:
    """Writes `model` in the native format; returns the reference kwargs."""
    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    write_reference_checkpoint(prefix, torch_to_reference(state, model.config.num_heads),
                               num_shards=num_shards, max_chunk_bytes=max_chunk_bytes)
    return config_to_reference(model.config)
