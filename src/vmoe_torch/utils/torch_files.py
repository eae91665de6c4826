"""Reading `torch.save` files without running code from them.

`torch.load(weights_only=True)` unpickles tensors, containers and numbers
only. Training checkpoints written by timm's train.py (`*.pth.tar`) also
hold the run's `argparse.Namespace`, a plain attribute bag: it is allowed
too, and nothing else is.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch


class UnsafeFileError(ValueError):
    """A torch file that holds Python objects other than tensors and plain data."""


def load_torch_file(path: str) -> Any:
    """The object in the `torch.save` file `path`, on the CPU, read with
    `weights_only=True` (plus `argparse.Namespace`). Raises UnsafeFileError
    naming the file when it holds other objects (a pickled module, say)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any failure with the file name
        name = os.path.basename(path)
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            found = str(e).split("Unsupported global:")[-1].split("\n")[0].strip() if "Unsupported global" \
                in str(e) else "Python objects"
            raise UnsafeFileError(
                f"{name} ({path}) holds {found} besides tensors: it was saved with the objects "
                "themselves (torch.save(model) rather than torch.save(model.state_dict())). It is not "
                "read, because unpickling it could run code. Where it came from, save the state dict "
                "(torch.save(model.state_dict(), 'weights.pth')) or safetensors, and pass that file.") from e
        raise UnsafeFileError(f"Cannot read {name} ({path}) as a torch file: {e}") from e
