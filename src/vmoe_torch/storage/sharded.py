"""Sharded checkpoint files: what torch.distributed.checkpoint (DCP) writes
when every rank saves only its own shards, read and written under global
names and shapes (`vmoe_torch.distributed.state` maps a live sharded model
to them), and their consolidation into one `from_pretrained` directory.

Keys: "model/<name>", "optim/<parameter name>/<state key>", "rng/torch".

The consolidation reads one tensor at a time from the DCP checkpoint and
appends it to model.safetensors, whose header is written first from the
checkpoint's metadata (names, shapes, dtypes): the whole state is never in
memory, so a model larger than one machine's memory is consolidated on any
rank or machine that sees the files. safetensors itself has no streaming
writer; the file layout (an 8-byte little-endian header size, a JSON header,
the raw bytes in header order) is safetensors' published format and the
result is read back by safetensors in the tests.
"""
from __future__ import annotations

import json
import os
import struct
import warnings
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from ..utils.io import atomic_directory
from ..utils.state import state_mismatch
from .pretrained import FINGERPRINT_KEY, architecture_fingerprint, read_config, write_metadata

MODEL, OPTIM, RNG = "model/", "optim/", "rng/torch"
Spec = tuple[tuple[int, ...], torch.dtype]


def specs_of(state: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


# torch.distributed.checkpoint is imported where used: it costs ~0.5 s of
# start-up, and loading a from_pretrained model never needs it.


def read_specs(path: str) -> dict[str, Spec]:
    """The tensors a DCP checkpoint holds: {key: (global shape, dtype)}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    metadata = dcp.FileSystemReader(path).read_metadata()
    return {k: (tuple(m.size), m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}


def save(path: str, state: dict[str, torch.Tensor]) -> None:
    """Every rank writes its shards into directory `path` (a collective call
    under a process group); DCP's coordinator writes `.metadata` last."""
    import torch.distributed.checkpoint as dcp
    no_dist = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():  # DCP warns that one process is one process
        warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(path, sync_files=True), no_dist=no_dist)


class UnreadableCheckpoint(ValueError):
    """A DCP checkpoint a rank could not read (raised on every rank)."""


def load(path: str, state: dict[str, torch.Tensor], collective: Optional[bool] = None) -> None:
    """Loads `path` into `state` in place (each rank reads only its
    shards). `collective=False` reads alone even inside a process group.
    A file any rank cannot read raises UnreadableCheckpoint on every rank
    (DCP's CheckpointException is a BaseException; it is converted here)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    no_dist = not (dist.is_available() and dist.is_initialized()) if collective is None else not collective
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=no_dist)
    except CheckpointException as e:
        damage = damaged_files(path)
        raise UnreadableCheckpoint(f"{path!r}: {damage or _first_lines(e)}") from e


def damaged_files(path: str) -> str:
    """The data files of DCP checkpoint `path` that are missing or shorter
    than its .metadata says, e.g. "__1_0.distcp is truncated (100 of 20,311
    bytes)"; "" when none is (or the metadata itself cannot be read)."""
    import torch.distributed.checkpoint as dcp
    try:
        storage = dcp.FileSystemReader(path).read_metadata().storage_data
    except Exception:  # noqa: BLE001 - the caller reports DCP's own error instead
        return ""
    needed: dict[str, int] = {}
    for info in (storage or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.exists(file):
            problems.append(f"{name} is missing")
        elif os.path.getsize(file) < size:
            problems.append(f"{name} is truncated ({os.path.getsize(file):,} of {size:,} bytes)")
    return "; ".join(problems)


def _first_lines(e: Any) -> str:
    """The first line of each rank's failure in DCP's CheckpointException."""
    errors = {r: err[0] if isinstance(err, tuple) else err for r, err in (e.failures or {}).items()}
    return "; ".join(f"rank {r}: {type(err).__name__}: {err}" for r, err in sorted(errors.items())) or str(e)


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                       torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def model_specs(path: str, expected: Optional[Mapping[str, tuple[int, ...]]] = None) -> dict[str, Spec]:
    """{name: (global shape, dtype)} of the model tensors of sharded checkpoint
    `path`, checked against `expected` ({name: shape}, a model's state) when
    given; refused with the checkpoint's name when unreadable or mismatched."""
    try:
        specs = read_specs(path)
    except Exception as e:  # noqa: BLE001 - name the checkpoint, whatever DCP says
        raise ValueError(f"Cannot read the sharded checkpoint {path!r} ({type(e).__name__}: {e}).") from e
    found = {k[len(MODEL):]: v for k, v in specs.items() if k.startswith(MODEL)}
    if expected is not None:
        problems = state_mismatch(dict(expected), {k: s for k, (s, _) in found.items()})
        if problems:
            raise ValueError(f"Checkpoint {path!r} does not match its config.json:" + problems)
    return found


def consolidate_sharded(path: str, out_dir: str, expected: Optional[Mapping[str, tuple[int, ...]]] = None,
                        overwrite: bool = False) -> None:
    """Writes the model of sharded checkpoint `path` as a `from_pretrained`
    directory, one tensor in memory at a time (reads alone, also inside a
    process group). `expected`: the model's {name: shape}, checked first."""
    cfg = read_config(path)
    specs = model_specs(path, expected)
    names = sorted(specs)
    header: dict[str, object] = {"__metadata__": {FINGERPRINT_KEY: architecture_fingerprint(cfg)}}
    offset = 0
    for name in names:
        shape, dtype = specs[name]
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{name!r} has dtype {dtype}, which the consolidation does not write.")
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
                load(path, {MODEL + name: tensor}, collective=False)
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
            f.flush()
            os.fsync(f.fileno())
        write_metadata(tmp, cfg, {"exported_from": os.path.basename(os.path.normpath(path))})
