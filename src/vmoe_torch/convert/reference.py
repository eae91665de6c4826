"""Reference (vmoe native) checkpoints <-> VisionTransformerMoe."""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..models.vit_moe import VisionTransformerMoe
from ..utils.state import refuse_nonfinite
from .mapping import map_reference_name, torch_to_reference
from .native import iter_reference_checkpoint, read_index, write_reference_checkpoint
from .reference_config import config_from_reference, config_to_reference


def load_reference_config(path: str) -> dict[str, Any]:
    """Reads a fixture-style config.json (with `constructor_kwargs` and
    `model_class`) or a plain kwargs JSON; the model class, when given,
    travels as the kwargs' `name` (as in vmoe's configs)."""
    with open(path) as f:
        data = json.load(f)
    kwargs = dict(data.get("constructor_kwargs", data))
    if "model_class" in data and "name" not in kwargs:
        kwargs["name"] = data["model_class"]
    return kwargs


def model_from_reference(prefix: str, model_config: Mapping[str, Any],
                         image_size: Optional[int | tuple[int, int]] = None,
                         allow_nonfinite: bool = False) -> VisionTransformerMoe:
    """Reads a native checkpoint and builds the model it belongs to (eval mode).

    The model is allocated once, uninitialised, and every array is copied into
    its parameter as soon as the reader has all of the array's chunks, then
    dropped: peak memory stays near one copy of the parameters.

    Args:
      prefix: checkpoint prefix (`<prefix>.index`, `<prefix>.data-*`).
      model_config: the reference constructor kwargs.
      image_size: the resolution the learned position embedding is for;
        inferred from the checkpoint when omitted. To run at another size,
        call `model.resize_pos_embed(size)` afterwards.
      allow_nonfinite: accept NaN / Inf weights. The native format has no
        checksum, so by default every array is checked and a non-finite one
        (e.g. flipped bytes in a shard) is an error that names it.
    """
    _, leaves = read_index(prefix)
    shapes = {name: np.empty(0) for name, _ in leaves}
    pos = dict(leaves).get("Encoder/posembed_input/pos_embedding")
    if pos is not None:
        shapes["Encoder/posembed_input/pos_embedding"] = np.empty(pos.shape, np.float32)
    cfg = config_from_reference(model_config, shapes, image_size)
    with torch.device("meta"):
        model = VisionTransformerMoe(cfg)
    model = model.to_empty(device="cpu")
    own = dict(model.named_parameters())
    filled: dict[str, int] = {}
    unmapped, mismatched, nonfinite = [], [], []
    with torch.no_grad():
        for name, arr in iter_reference_checkpoint(prefix):
            mapped = map_reference_name(name, arr)
            if mapped is None:
                unmapped.append(name)
                continue
            target, value, part = mapped
            if target not in own:
                mismatched.append(f"{name} -> {target}: not in the model")
                continue
            param = own[target]
            region = param if part is None else param.chunk(part[1], dim=0)[part[0]]
            if tuple(region.shape) != value.shape:
                mismatched.append(f"{name}: checkpoint {value.shape} vs model {tuple(region.shape)}")
                continue
            if not allow_nonfinite and not np.isfinite(value).all():
                nonfinite.append(f"{name} ({int((~np.isfinite(value)).sum())} values)")
            region.copy_(torch.from_numpy(value))
            filled[target] = filled.get(target, 0) + 1
            del arr, value
    need = {n: 1 for n in own}
    for target in [n for n in own if n.endswith(("attn.qkv.weight", "attn.qkv.bias"))]:
        need[target] = 3
    for target in [n for n in own if n.endswith(("attn.kv.weight", "attn.kv.bias"))]:
        need[target] = 2
    missing = sorted(n for n in own if filled.get(n, 0) != need[n])
    if nonfinite:
        raise ValueError(f"The checkpoint {prefix!r} holds non-finite (NaN/Inf) weights in "
                         f"{nonfinite}: a damaged shard? Pass allow_nonfinite=True (--allow-nonfinite) "
                         "to load it anyway.")
    if unmapped or mismatched or missing:
        raise ValueError("The checkpoint does not match the given config:"
                         + (f"\n  reference parameters with no mapping: {sorted(unmapped)}" if unmapped else "")
                         + (f"\n  shape mismatches / not in the model: {mismatched}" if mismatched else "")
                         + (f"\n  missing in checkpoint: {missing}" if missing else ""))
    return model.eval()


def model_to_reference(model: VisionTransformerMoe, prefix: str, num_shards: int = 1,
                       max_chunk_bytes: Optional[int] = None, overwrite: bool = False,
                       allow_nonfinite: bool = False) -> dict[str, Any]:
    """Writes `model` in the native format; returns the reference kwargs.

    Everything that can refuse (settings the reference cannot express, names
    with no mapping, NaN/Inf weights, an existing checkpoint at `prefix`
    without `overwrite`) is checked before the first byte is written, and a
    write that fails part-way removes what it wrote."""
    kwargs = config_to_reference(model.config)  # raises for what the reference cannot express
    state = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    if not allow_nonfinite:
        refuse_nonfinite(state, prefix)
    cfg = model.config
    ensemble = cfg.moe.ensemble_size if cfg.moe is not None else 1
    params = torch_to_reference(state, cfg.num_heads, ensemble)
    write_reference_checkpoint(prefix, params, num_shards=num_shards, max_chunk_bytes=max_chunk_bytes,
                               overwrite=overwrite)
    return kwargs
