"""Train-state checkpoints: model, optimiser, step, RNG states and data
position, without pickle (safetensors for tensors, JSON for the rest).

Layout: WORKDIR/checkpoints/step_00000123/{model.safetensors,
optimizer.safetensors, state.json}. Each checkpoint is written to a
temporary directory and renamed into place, so a kill at any moment leaves
either the old set or the new one; the last `keep` are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils.io import atomic_directory
from ..utils.workdir import checkpoint_dir, latest_checkpoint, list_checkpoints

__all__ = ["CorruptCheckpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint",
           "load_latest_valid", "save_checkpoint"]

def _optimizer_to_flat(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            name = f"{idx}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def save_checkpoint(workdir: str, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], extra: dict[str, Any], keep: int = 2) -> str:
    """Writes checkpoint `step` atomically and prunes old ones; returns its path.
    `model_state`/`optimizer_state` are full (unsharded) state dicts."""
    final = Path(checkpoint_dir(workdir, step))
    with atomic_directory(str(final), overwrite=True) as tmp_dir:
        tmp = Path(tmp_dir)
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer_state)
        opt_tensors["__torch_rng_state__"] = torch.get_rng_state()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "rng": rng_state(), **extra}
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
    for _, path in list_checkpoints(workdir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    return str(final)


class CorruptCheckpoint(ValueError):
    """A checkpoint directory whose files cannot be read."""


def load_latest_valid(workdir: str) -> Optional[tuple[str, dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]]:
    """The newest readable checkpoint as (path, model state, optimizer state,
    state.json), or None when there is none. Unreadable newer ones (truncated
    safetensors, a torn state.json) are skipped with a warning naming them;
    when every checkpoint is unreadable this raises, listing why."""
    skipped = []
    for _, path in reversed(list_checkpoints(workdir)):
        try:
            return (path, *load_checkpoint(path))
        except CorruptCheckpoint as e:
            skipped.append(str(e))
            warnings.warn(f"Skipping unreadable checkpoint: {e}")
    if skipped:
        raise CorruptCheckpoint("No readable checkpoint in " + repr(workdir) + ": " + "; ".join(skipped)
                                + ". Move the checkpoints/ directory away to start over.")
    return None


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Reads (model state, optimizer state dict, state.json) from `path` and
    restores the RNG states."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        model_state = load_file(os.path.join(path, "model.safetensors"))
        tensors = load_file(os.path.join(path, "optimizer.safetensors"))
        for key in ("step", "optimizer", "rng"):
            if key not in state:
                raise KeyError(f"state.json has no {key!r}")
    except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise CorruptCheckpoint(f"{path!r} ({type(e).__name__}: {e})") from e
    torch.set_rng_state(tensors.pop("__torch_rng_state__"))
    optimizer_state = _optimizer_from_flat(tensors, state["optimizer"])
    version, internal, gauss = state["rng"]["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["rng"]["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    return model_state, optimizer_state, state
