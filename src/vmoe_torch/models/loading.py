"""Models out of whatever the user has on disk: a training work dir (its
newest readable checkpoint), one checkpoint of either layout
(`vmoe_torch.storage.workdir`), or a `from_pretrained` directory; and
`consolidate`, which writes any of them as one `from_pretrained` directory.
"""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

from ..storage import sharded
from ..storage.pretrained import read_config
from ..storage.workdir import is_sharded_checkpoint, is_training_workdir, is_workdir, newest_readable
from .vit_moe import VisionTransformerMoe

T = TypeVar("T")


def _shapes(model: VisionTransformerMoe) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_sharded_checkpoint(path: str, map_location: str = "cpu") -> VisionTransformerMoe:
    """The model of a sharded (DCP) checkpoint, in one process, in eval mode."""
    with torch.device("meta"):
        model = VisionTransformerMoe(read_config(path))
    specs = sharded.model_specs(path, _shapes(model))
    model.to_empty(device=map_location)
    dtypes = {dtype for _, dtype in specs.values() if dtype.is_floating_point}
    if len(dtypes) == 1:  # the checkpoint's precision, as from_pretrained keeps it
        model.to(dtypes.pop())
    model.materialize_noise_seeds(map_location)
    entries = {sharded.MODEL + k: v for k, v in model.state_dict().items()}  # the live storage
    try:
        sharded.load(path, entries, collective=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"Cannot read the sharded checkpoint {path!r} ({type(e).__name__}: {e}).") from e
    return model.eval()


def consolidate_checkpoint(path: str, out_dir: str, overwrite: bool = False) -> None:
    """Writes the model of one checkpoint (either layout) as a
    `from_pretrained` directory; a sharded one is streamed one tensor at a
    time (`vmoe_torch.storage.sharded.consolidate_sharded`)."""
    if is_sharded_checkpoint(path):
        with torch.device("meta"):
            expected = _shapes(VisionTransformerMoe(read_config(path)))
        sharded.consolidate_sharded(path, out_dir, expected, overwrite)
    else:
        VisionTransformerMoe.from_pretrained(path).save_pretrained(
            out_dir, overwrite, source={"exported_from": os.path.basename(os.path.normpath(path))})


def _newest_readable(workdir: str, use: Callable[[str], T]) -> tuple[str, T]:
    """`storage.workdir.newest_readable`, for a work dir that must hold one."""
    found = newest_readable(workdir, use)
    if found is None:
        raise FileNotFoundError(f"Work dir {workdir!r} holds no checkpoint yet.")
    return found


def consolidate(path: str, out_dir: str, overwrite: bool = False) -> str:
    """Writes the model of a work dir's newest readable checkpoint, or of one
    checkpoint directory, as a `from_pretrained` directory (`vmoe
    consolidate`). Returns the checkpoint used."""
    if is_workdir(path):
        return _newest_readable(path, lambda ckpt: consolidate_checkpoint(ckpt, out_dir, overwrite))[0]
    consolidate_checkpoint(path, out_dir, overwrite)
    return path


def load_model(path: str) -> VisionTransformerMoe:
    """A model from a training work dir (its newest readable checkpoint, of
    either layout; unreadable newer ones are skipped with a warning, as on
    resume), from one checkpoint directory, or from a `from_pretrained`
    directory."""
    if is_workdir(path):
        return _newest_readable(path, load_model)[1]
    if is_sharded_checkpoint(path):
        return load_sharded_checkpoint(path)
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return VisionTransformerMoe.from_pretrained(path)
    if is_training_workdir(path):
        raise FileNotFoundError(f"{path!r} is a training work dir that holds no checkpoint yet (the first is "
                                "written at train.checkpoint_every steps).")
    raise FileNotFoundError(f"{path!r} is neither a training work dir, a checkpoint, nor a from_pretrained "
                            "directory.")
