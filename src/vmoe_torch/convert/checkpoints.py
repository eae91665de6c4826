"""Models out of training work dirs and checkpoints of either layout
(utils/workdir.py), and the streaming export of a sharded checkpoint to the
single-file `from_pretrained` format.

The export reads one tensor at a time from the DCP checkpoint and appends it
to model.safetensors, whose header is written first from the checkpoint's
metadata (names, shapes, dtypes): the whole state is never in memory, so a
model larger than one machine's memory exports on any rank or machine that
sees the files. safetensors itself has no streaming writer; the file layout
(an 8-byte little-endian header size, a JSON header, the raw bytes in
header order) is safetensors' published format and the result is read back
by safetensors in the tests.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
from typing import Callable, TypeVar

import torch

from ..distributed import dcp
from ..models.vit_moe import VisionTransformerMoe
from ..utils.io import atomic_directory
from ..utils.state import state_mismatch
from ..utils.workdir import is_sharded_checkpoint, is_workdir, list_checkpoints
from .pretrained import (
    FINGERPRINT_KEY,
    architecture_fingerprint,
    from_pretrained,
    materialize_noise_seeds,
    read_config,
    save_pretrained,
    write_metadata,
)

T = TypeVar("T")
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                       torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _model_specs(path: str, model: VisionTransformerMoe) -> dict[str, dcp.Spec]:
    """The checkpoint's model tensors, checked against `model`'s state."""
    try:
        specs = dcp.read_specs(path)
    except Exception as e:  # noqa: BLE001 - name the checkpoint, whatever DCP says
        raise ValueError(f"Cannot read the sharded checkpoint {path!r} ({type(e).__name__}: {e}).") from e
    found = {k[len(dcp.MODEL):]: v for k, v in specs.items() if k.startswith(dcp.MODEL)}
    problems = state_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                              {k: s for k, (s, _) in found.items()})
    if problems:
        raise ValueError(f"Checkpoint {path!r} does not match its config.json:" + problems)
    return found


def load_sharded_checkpoint(path: str, map_location: str = "cpu") -> VisionTransformerMoe:
    """The model of a sharded (DCP) checkpoint, in one process, in eval mode."""
    with torch.device("meta"):
        model = VisionTransformerMoe(read_config(path))
    specs = _model_specs(path, model)
    model.to_empty(device=map_location)
    dtypes = {dtype for _, dtype in specs.values() if dtype.is_floating_point}
    if len(dtypes) == 1:  # the checkpoint's precision, as from_pretrained keeps it
        model.to(dtypes.pop())
    materialize_noise_seeds(model, map_location)
    try:
        dcp.load(path, dcp.model_entries(model), collective=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"Cannot read the sharded checkpoint {path!r} ({type(e).__name__}: {e}).") from e
    return model.eval()


def export_checkpoint(path: str, out_dir: str, overwrite: bool = False) -> None:
    """Writes the model of sharded checkpoint `path` as a `from_pretrained`
    directory, one tensor in memory at a time (reads alone, also inside a
    process group)."""
    cfg = read_config(path)
    with torch.device("meta"):
        specs = _model_specs(path, VisionTransformerMoe(cfg))
    names = sorted(specs)
    header: dict[str, object] = {"__metadata__": {FINGERPRINT_KEY: architecture_fingerprint(cfg)}}
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name!r} has dtype {dtype}, which the export does not write.")
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_directory(out_dir, overwrite) as tmp:
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for name in names:
                shape, dtype = specs[name]
                tensor = torch.empty(shape, dtype=dtype)
                dcp.load(path, {dcp.MODEL + name: tensor}, collective=False)
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        write_metadata(tmp, cfg, {"exported_from": os.path.abspath(path)})


def _newest_readable(workdir: str, use: Callable[[str], T]) -> tuple[str, T]:
    """(checkpoint, use(checkpoint)) for the newest checkpoint of `workdir`
    that `use` can read; unreadable newer ones are skipped with a warning, as
    on resume. A FileExistsError (the output is there) is not skipped."""
    found = list_checkpoints(workdir)
    if not found:
        raise FileNotFoundError(f"Work dir {workdir!r} holds no checkpoint yet.")
    errors = []
    for _, ckpt in reversed(found):
        try:
            return ckpt, use(ckpt)
        except FileExistsError:
            raise
        except (ValueError, OSError) as e:
            errors.append(f"{ckpt!r}: {e}")
            warnings.warn(f"Skipping unreadable checkpoint {ckpt!r}: {e}")
    raise ValueError(f"No readable checkpoint in {workdir!r}: " + "; ".join(errors))


def _export_one(ckpt: str, out_dir: str, overwrite: bool) -> None:
    if is_sharded_checkpoint(ckpt):
        export_checkpoint(ckpt, out_dir, overwrite)
    else:
        save_pretrained(from_pretrained(ckpt), out_dir, overwrite, source={"exported_from": os.path.abspath(ckpt)})


def export_model(path: str, out_dir: str, overwrite: bool = False) -> str:
    """Writes the model of a work dir's newest readable checkpoint, or of one
    checkpoint directory, as a `from_pretrained` directory; a sharded
    checkpoint is streamed (`export_checkpoint`). Returns the checkpoint used."""
    if is_workdir(path):
        return _newest_readable(path, lambda ckpt: _export_one(ckpt, out_dir, overwrite))[0]
    _export_one(path, out_dir, overwrite)
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
        return from_pretrained(path)
    raise FileNotFoundError(f"{path!r} is neither a training work dir, a checkpoint, nor a from_pretrained "
                            "directory.")
