"""Reading dense ViT weight files without unpickling anything untrusted.

- `.safetensors`: safetensors (a pickle renamed `.safetensors` is refused
  with a message saying so);
- `.bin` / `.pth` / `.pt` / `.pth.tar`: `torch.load(weights_only=True)`
  (`utils.torch_files`), which refuses arbitrary objects;
- `.npz`: `numpy.load(allow_pickle=False)`;
- a directory: `model.safetensors` (else `pytorch_model.bin`) with its
  `config.json` (Hugging Face layout).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..utils.io import looks_like_pickle
from ..utils.torch_files import UnsafeFileError, load_torch_file

State = dict[str, torch.Tensor]


class SourceError(ValueError):
    """A dense source that cannot be read or mapped; the message names the file
    and the fix."""


def load_safetensors(path: str) -> State:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        if looks_like_pickle(path):
            raise SourceError(f"{path!r} is not a safetensors file (it looks like a pickle / "
                              "torch.save file). Rename it .pth/.bin to load it with "
                              "torch.load(weights_only=True), or convert it to safetensors.") from e
        raise SourceError(f"{path!r} is not a readable safetensors file (truncated or corrupt?): "
                          f"{e}") from e


@dataclass
class WeightFile:
    """The tensors of one weight file, the file itself, and what a training
    checkpoint recorded beside them (timm train.py's `arch` and `args`)."""

    state: State
    file: str
    meta: dict[str, Any] = field(default_factory=dict)


def _load_torch(path: str) -> WeightFile:
    try:
        obj = load_torch_file(path)
    except UnsafeFileError as e:
        raise SourceError(str(e)) from e
    meta: dict[str, Any] = {}
    if isinstance(obj, dict):
        if isinstance(obj.get("arch"), str):
            meta["arch"] = obj["arch"]
        if hasattr(obj.get("args"), "__dict__"):
            meta["args"] = dict(vars(obj["args"]))
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SourceError(f"{path!r} does not hold a state_dict of tensors.")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return WeightFile(state, path, meta)


def load_torch(path: str) -> State:
    return _load_torch(path).state


def load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"Cannot read {path!r} as a numpy .npz archive (without pickle): {e}") from e


def weight_file(path: str) -> str:
    """The weight file `path` names: itself, or in a model directory
    model.safetensors (else pytorch_model.bin)."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                return os.path.join(path, name)
        raise SourceError(f"{path!r} has neither model.safetensors nor pytorch_model.bin.")
    if not os.path.exists(path):
        raise SourceError(f"{path!r} does not exist.")
    return path


def read_weight_file(path: str) -> WeightFile:
    """The state_dict in a .safetensors / .bin / .pth / .pt / .pth.tar file or
    a Hugging Face / timm model directory, with the file's name."""
    file = weight_file(path)
    if file.endswith(".safetensors"):
        return WeightFile(load_safetensors(file), file)
    if file.endswith((".bin", ".pth", ".pt", ".pth.tar")):
        return _load_torch(file)
    raise SourceError(f"Unknown weight file type {file!r}: use .safetensors, .bin, .pth, .pt, .pth.tar "
                      "(or .npz for vit_jax).")


def load_weights(path: str) -> State:
    """A state_dict from a .safetensors / .bin / .pth / .pt file or a Hugging
    Face model directory."""
    return read_weight_file(path).state


def load_json(path: str) -> Optional[dict[str, Any]]:
    """A JSON file next to the weights, or None when absent."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path!r} is not valid JSON: {e}") from e
