"""timm's training checkpoints (`train.py`'s `*.pth.tar`), read as data.

A timm checkpoint is a dict: `state_dict` (and `state_dict_ema` with
`--model-ema`), `arch` (the registered model name), `args` (the run's
argparse.Namespace: num_classes, img_size, ...), `epoch`, `optimizer`, ...
It is read with `torch.load(weights_only=True)` (`utils.torch_files`):
tensors and plain data only.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from torch import Tensor

from ..utils.torch_files import load_torch_file


@dataclasses.dataclass(frozen=True)
class TimmCheckpoint:
    """The weights of a timm checkpoint and what it records of the model."""

    state_dict: dict[str, Tensor]
    arch: Optional[str]        # the timm model name train.py trained
    args: dict[str, Any]       # the run's arguments (empty for a bare state dict)


# Where training checkpoints keep their weights: timm's train.py, and common others.
_WRAPPERS = ("state_dict", "model", "module")


def read_timm_checkpoint(path: str, use_ema: bool = False) -> TimmCheckpoint:
    """Reads `path` (a `.pth.tar` / `.pth` from timm's train.py, another
    training checkpoint keeping its weights under "state_dict" / "model" /
    "module", or a bare state dict); `use_ema` takes the EMA weights
    (`state_dict_ema`). A DDP `module.` prefix is removed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} is not a file.")
    obj = load_torch_file(path)
    name = os.path.basename(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{name} holds a {type(obj).__name__}, not a checkpoint dict or a state dict.")
    if use_ema and "state_dict_ema" not in obj:
        raise ValueError(f"{name} has no EMA weights (state_dict_ema): it was trained without "
                         "--model-ema. Drop --use-ema.")
    keys = ("state_dict_ema",) if use_ema else _WRAPPERS
    state = next((obj[k] for k in keys if isinstance(obj.get(k), dict)), obj)
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{name} holds no state dict of tensors (keys: {sorted(obj)[:8]}).")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    args = obj.get("args")
    return TimmCheckpoint(state, obj.get("arch") if isinstance(obj.get("arch"), str) else None,
                          dict(vars(args)) if args is not None and hasattr(args, "__dict__") else {})
