"""Train-state checkpoints: model, optimiser, step, RNG states and data
position, in one of two layouts (utils/workdir.py):

- full (one process, or a replicated data-parallel run): rank 0 writes
  model.safetensors, optimizer.safetensors and state.json, no pickle;
- sharded (FSDP2 and/or expert parallelism): every rank writes only its own
  shards with torch.distributed.checkpoint (DCP), under the unsharded
  model's names and shapes (storage/sharded.py, distributed/state.py), plus state.json.

Either way a checkpoint is written into a temporary directory and renamed
into place by rank 0 only once every file is complete and synced, so a kill
at any moment leaves the last complete checkpoint intact; `list_checkpoints`
sees only renamed ones. The last `keep` are kept.

Both layouts load into any run (`restore`): one process, another world
size, another mesh; a checkpoint that cannot be read is skipped for the
next older one (`restore_latest`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed.expert_parallel import global_name
from ..storage import sharded
from ..storage.workdir import (
    CorruptCheckpoint,
    checkpoint_dir,
    is_sharded_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    newest_readable,
)
from ..utils.io import atomic_directory, commit_directory, temporary_directory
from ..utils.state import state_mismatch

__all__ = ["CorruptCheckpoint", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "restore",
           "restore_latest", "save_checkpoint", "save_sharded_checkpoint"]


def _dstate() -> Any:
    """`distributed.state`, imported when a checkpoint is saved or restored:
    it imports DTensor, about 0.5 s of every process's start-up."""
    from ..distributed import state
    return state


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


def _set_rng_state(rng: dict[str, Any], torch_state: torch.Tensor) -> None:
    torch.set_rng_state(torch_state)
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = rng["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def _write_json(path: Path, data: Any) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _prune(workdir: str, keep: int) -> None:
    for _, path in list_checkpoints(workdir)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(workdir: str, step: int, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any], extra: dict[str, Any], keep: int = 2,
                    files: Optional[dict[str, Any]] = None) -> str:
    """Writes full checkpoint `step` atomically (one process) and prunes old
    ones; returns its path. `files`: more JSON files to put in it."""
    final = Path(checkpoint_dir(workdir, step))
    with atomic_directory(str(final), overwrite=True) as tmp_dir:
        tmp = Path(tmp_dir)
        save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                  str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_flat(optimizer_state)
        opt_tensors["__torch_rng_state__"] = torch.get_rng_state()
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        for name, data in (files or {}).items():
            _write_json(tmp / name, data)
        _write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, "rng": rng_state(), **extra})
    _prune(workdir, keep)
    return str(final)


def save_sharded_checkpoint(workdir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            extra: dict[str, Any], keep: int = 2,
                            files: Optional[dict[str, Any]] = None) -> str:
    """A collective call: every rank writes its own shards of the model and
    optimizer state (DCP) into one temporary directory; after DCP has
    written `.metadata` (once every rank's files are complete), rank 0 adds
    state.json and renames the directory into place. Returns its path."""
    final = checkpoint_dir(workdir, step)
    group = dist.is_available() and dist.is_initialized()  # one process may write this layout too
    lead = not group or dist.get_rank() == 0
    box = [temporary_directory(final) if lead else None]
    if group:
        dist.broadcast_object_list(box)
    tmp = str(box[0])
    try:
        opt_tensors, opt_meta = _dstate().optimizer_entries(optimizer, model)
        sharded.save(tmp, {**_dstate().model_entries(model), **opt_tensors, sharded.RNG: torch.get_rng_state()})
        if lead:
            for name, data in (files or {}).items():
                _write_json(Path(tmp) / name, data)
            _write_json(Path(tmp) / "state.json", {"step": step, "optimizer": opt_meta, "rng": rng_state(),
                                                  "format": "dcp", **extra})
            commit_directory(tmp, final, overwrite=True)
            _prune(workdir, keep)
    except BaseException:
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if group:
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is visible
    return final


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Reads a full checkpoint: (model state, optimizer state dict,
    state.json), and restores the RNG states."""
    try:
        state = _read_state_json(path)
        model_state = load_file(os.path.join(path, "model.safetensors"))
        tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    except Exception as e:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
        raise CorruptCheckpoint(f"{path!r} ({type(e).__name__}: {e})") from e
    _set_rng_state(state["rng"], tensors.pop("__torch_rng_state__"))
    return model_state, _optimizer_from_flat(tensors, state["optimizer"]), state


def _read_state_json(path: str) -> dict[str, Any]:
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    for key in ("step", "optimizer", "rng"):
        if key not in state:
            raise KeyError(f"state.json has no {key!r}")
    return state


def _check_model(model_entries: dict[str, torch.Tensor], specs: dict[str, sharded.Spec], path: str) -> None:
    own = {k[len(sharded.MODEL):]: tuple(v.shape) for k, v in model_entries.items()}
    found = {k[len(sharded.MODEL):]: s for k, (s, _) in specs.items() if k.startswith(sharded.MODEL)}
    problems = state_mismatch(own, found)
    if problems:
        raise ValueError(f"Checkpoint {path!r} does not match the model config:" + problems)


def restore(path: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Loads checkpoint `path` (either layout) into `model` and `optimizer`,
    however they are sharded now, and restores the RNG states; returns
    state.json. Raises CorruptCheckpoint when a file cannot be read (the
    same on every rank), ValueError when it belongs to another model."""
    entries = _dstate().model_entries(model)
    if is_sharded_checkpoint(path):
        try:
            state = _read_state_json(path)
            specs = sharded.read_specs(path)
        except Exception as e:  # noqa: BLE001
            raise CorruptCheckpoint(f"{path!r} ({type(e).__name__}: {e})") from e
        _check_model(entries, specs, path)
        opt_entries = _dstate().optimizer_templates(optimizer, model, specs)
        rng = torch.get_rng_state()
        try:
            sharded.load(path, {**entries, **opt_entries, sharded.RNG: rng})
        except Exception as e:  # noqa: BLE001 - DCP reports a bad file on every rank
            raise CorruptCheckpoint(f"{path!r} ({type(e).__name__}: {e})") from e
        _dstate().load_optimizer(optimizer, model, opt_entries, state["optimizer"])
        _set_rng_state(state["rng"], rng)
        return state
    model_state, opt_state, state = load_checkpoint(path)
    full = {sharded.MODEL + k: v for k, v in model_state.items()}
    _check_model(entries, sharded.specs_of(full), path)
    by_name, meta = _optimizer_by_name(opt_state, optimizer, model)
    full.update(by_name)
    opt_entries = _dstate().optimizer_templates(optimizer, model, sharded.specs_of(by_name))
    _dstate().copy_full({**entries, **opt_entries}, full)
    _dstate().load_optimizer(optimizer, model, opt_entries, meta)
    return state


def _optimizer_by_name(sd: dict[str, Any], optimizer: torch.optim.Optimizer,
                       model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A full optimizer state dict (indexed in parameter order) in the named
    form of `_dstate().optimizer_entries`."""
    names = {id(p): global_name(n) for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if sum(len(g["params"]) for g in sd["param_groups"]) != len(order):
        raise ValueError("The checkpoint's optimizer was built over other parameters than this run's "
                         "(finetune.freeze or the model changed?); start a new work dir.")
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, s in sd["state"].items():
        for key, value in s.items():
            entry = f"{sharded.OPTIM}{order[int(idx)]}/{key}"
            (tensors if torch.is_tensor(value) else scalars)[entry] = value
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_latest(workdir: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[dict[str, Any]]:
    """Restores the newest readable checkpoint (see `restore`) and returns
    its state.json, or None when there is none (`storage.workdir.
    newest_readable`: unreadable newer ones are skipped with a warning
    naming them; when every checkpoint is unreadable this raises)."""
    found = newest_readable(workdir, lambda path: restore(path, model, optimizer), skip=(CorruptCheckpoint,))
    return None if found is None else found[1]
