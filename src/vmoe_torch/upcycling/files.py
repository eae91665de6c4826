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

from ..convert.timm_checkpoint import read_timm_checkpoint
from ..utils.io import looks_like_pickle

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
    """A torch file's weights (`convert.timm_checkpoint`: weights only, the
    usual training-checkpoint wrappers, timm's recorded `arch` and `args`)."""
    try:
        ckpt = read_timm_checkpoint(path)
    except ValueError as e:  # UnsafeFileError included: nothing is unpickled
        raise SourceError(f"{e} ({path})" if path not in str(e) else str(e)) from e
    meta: dict[str, Any] = {"args": ckpt.args} if ckpt.args else {}
    if ckpt.arch:
        meta["arch"] = ckpt.arch
    return WeightFile(ckpt.state_dict, path, meta)


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
