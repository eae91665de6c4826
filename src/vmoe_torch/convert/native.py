"""JAX-free reader and writer of vmoe's native sharded checkpoint format
(version "20220622"): `<prefix>.index` plus `<prefix>.data-KKKKK-of-NNNNN`.

Only msgpack and numpy are used. Shards are streamed one chunk at a time
(`msgpack.Unpacker.read_map_header`), each chunk copied straight into its
pre-allocated array, so peak memory stays near one copy of the parameters.
The format is described in docs/checkpoints.md.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import msgpack
import numpy as np

from ..utils.io import atomic_write_bytes

VERSION = "20220622"
MAGIC = "__msgpack_array_chunk_a87ca2__"
EXT_ARRAY, EXT_SCALAR, EXT_SHAPED, EXT_SLICE, EXT_NDSLICE, EXT_INDEX_INFO = 1, 3, 4, 5, 6, 8


class CheckpointError(ValueError):
    """A reference checkpoint is missing, truncated or inconsistent."""


@dataclass(frozen=True)
class IndexInfo:
    """Where the chunks of one array live."""

    shape: tuple[int, ...]
    dtype: str
    slices: tuple[tuple[tuple[int, int], ...], ...]  # per chunk: ((start, stop) per dim)
    shards: tuple[int, ...]


def shard_path(prefix: str, k: int, n: int) -> str:
    return f"{prefix}.data-{k:05d}-of-{n:05d}"


def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        return np.dtype("<u2")  # raw bits; widened to float32 by _decode_array
    return np.dtype(name).newbyteorder("<")


def _decode_array(payload: bytes) -> np.ndarray:
    shape, dtype, raw = msgpack.unpackb(payload, raw=False)
    arr = np.frombuffer(raw, _np_dtype(dtype)).reshape(shape)
    if dtype == "bfloat16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def _decode_slice(packed: bytes) -> tuple[int, int]:
    start, stop, step = msgpack.unpackb(packed, raw=False)
    if step not in (None, 1):
        raise CheckpointError(f"Strided chunk slices (step={step}) are not supported.")
    return start, stop


def _resolve(bounds: list[tuple[Optional[int], Optional[int]]], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((0 if a is None else a, dim if b is None else b) for (a, b), dim in zip(bounds, shape))


def _index_ext_hook(code: int, data: bytes) -> Any:
    if code == EXT_INDEX_INFO:
        shaped, slices, shards = msgpack.unpackb(data, raw=False)
        shape, dtype, _weak, _ = msgpack.unpackb(shaped, raw=False)
        shape = tuple(int(s) for s in shape)
        parsed = tuple(_resolve([_decode_slice(p) for p in msgpack.unpackb(s, raw=False)], shape)
                       for s in slices)
        return IndexInfo(shape, dtype, parsed, tuple(int(k) for k in shards))
    if code in (EXT_ARRAY, EXT_SCALAR):
        return _decode_array(data)
    return msgpack.ExtType(code, data)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Depth-first, keys in sorted string order: jax.tree_util's leaf order."""
    for key in sorted(tree):
        value = tree[key]
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            yield from _flatten(value, path)
        else:
            yield path, value


def read_index(prefix: str) -> tuple[int, list[tuple[str, IndexInfo]]]:
    """Returns (shard_count, [(name, IndexInfo)] in leaf-number order)."""
    path = f"{prefix}.index"
    if not os.path.exists(path):
        raise CheckpointError(f"Checkpoint index {path!r} not found. Pass the prefix, e.g. "
                              "'/ckpts/vmoe_s32' for '/ckpts/vmoe_s32.index'.")
    try:
        with open(path, "rb") as f:
            index = msgpack.unpackb(f.read(), raw=False, ext_hook=_index_ext_hook,
                                    strict_map_key=False)
        version, count, tree = index["version"], int(index["shard_count"]), index["index"]
    except Exception as e:  # msgpack raises many types on corrupt input
        raise CheckpointError(f"Checkpoint index {path!r} is corrupt or not a vmoe index: {e}") from e
    if version != VERSION:
        raise CheckpointError(f"Unsupported checkpoint version {version!r} in {path!r}; "
                              f"this reader knows {VERSION!r}.")
    leaves = list(_flatten(tree))
    bad = [name for name, info in leaves if not isinstance(info, IndexInfo)]
    if bad:
        raise CheckpointError(f"Index {path!r} has leaves without chunk information: {bad[:5]}.")
    return count, leaves


def read_reference_checkpoint(prefix: str) -> dict[str, np.ndarray]:
    """Reads a vmoe native checkpoint into {'/'-joined name: numpy array}.

    Raises:
      CheckpointError: on a missing or truncated shard, a corrupt index, or
        chunks that do not tile their arrays exactly.
    """
    return dict(iter_reference_checkpoint(prefix))


def iter_reference_checkpoint(prefix: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) as soon as all of an array's chunks are read, so a
    consumer that copies and drops each array keeps memory near one copy of
    the largest in-flight arrays instead of the whole checkpoint.

    Every shard file is checked to exist before anything is yielded; the
    per-shard chunk checks run as each shard is read (a consumer must not
    commit its result before the iterator is exhausted).
    """
    count, leaves = read_index(prefix)
    expected: dict[int, dict[int, set]] = {}
    remaining: dict[int, int] = {}
    for leaf, (name, info) in enumerate(leaves):
        volume = 0
        for sl, shard in zip(info.slices, info.shards):
            expected.setdefault(shard, {}).setdefault(leaf, set()).add(sl)
            volume += int(np.prod([b - a for a, b in sl])) if sl else 1
        if volume != int(np.prod(info.shape)):
            raise CheckpointError(f"Chunks of {name!r} cover {volume} elements, the array has "
                                  f"{int(np.prod(info.shape))}: the index is inconsistent.")
        remaining[leaf] = len(info.slices)
    paths = [shard_path(prefix, k, count) for k in range(count)]
    for path in paths:
        if not os.path.exists(path):
            raise CheckpointError(f"Shard {path!r} is missing ({count} shards expected).")
    in_flight: dict[int, np.ndarray] = {}
    for k, path in enumerate(paths):
        seen: dict[int, set] = {}
        for leaf in _read_shard(path, leaves, in_flight, seen):
            remaining[leaf] -= 1
            if remaining[leaf] == 0:
                yield leaves[leaf][0], in_flight.pop(leaf)
        want = expected.get(k, {})
        for leaf, slices in want.items():
            if seen.get(leaf, set()) != slices:
                raise CheckpointError(f"Shard {path!r} lacks chunks of {leaves[leaf][0]!r} that the "
                                      "index places there; the checkpoint is incomplete.")
        extra = set(seen) - set(want)
        if extra:
            raise CheckpointError(f"Shard {path!r} holds chunks the index does not list "
                                  f"(leaves {sorted(extra)[:5]}).")
    if in_flight or any(remaining.values()):
        raise CheckpointError("Some arrays did not receive all their chunks; the checkpoint is incomplete.")


def _read_shard(path: str, leaves: list[tuple[str, IndexInfo]], arrays: dict[int, np.ndarray],
                seen: dict[int, set]) -> Iterator[int]:
    """Streams one shard, writing each chunk into its array (allocated on
    first use) and yielding the leaf number after every chunk."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=max(size, 1 << 20),
                                        strict_map_key=False)
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                value = unpacker.unpack()
                if key == MAGIC:
                    continue
                leaf = int(key)
                if not 0 <= leaf < len(leaves):
                    raise CheckpointError(f"Shard {path!r} names unknown leaf {key!r}.")
                name, info = leaves[leaf]
                if leaf not in arrays:
                    dtype = np.float32 if info.dtype == "bfloat16" else np.dtype(info.dtype)
                    arrays[leaf] = np.empty(info.shape, dtype)
                target = arrays[leaf]
                for subchunks, ndslice in value:
                    if not (isinstance(ndslice, msgpack.ExtType) and ndslice.code == EXT_NDSLICE):
                        raise CheckpointError(f"Shard {path!r}: malformed chunk of {name!r}.")
                    bounds = _resolve([_decode_slice(p) for p in msgpack.unpackb(ndslice.data, raw=False)],
                                      target.shape)
                    pieces = [_decode_array(s.data) for s in subchunks]
                    chunk_shape = tuple(b - a for a, b in bounds)
                    flat = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
                    if flat.size != int(np.prod(chunk_shape)):
                        raise CheckpointError(f"Shard {path!r}: chunk of {name!r} has {flat.size} "
                                              f"values for a {chunk_shape} region.")
                    target[tuple(slice(a, b) for a, b in bounds)] = flat.reshape(chunk_shape)
                    seen.setdefault(leaf, set()).add(bounds)
                    del flat, pieces
                    yield leaf
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"Shard {path!r} is truncated or corrupt: {type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ writer
def _pack_slice(bounds: tuple[tuple[int, int], ...]) -> list[bytes]:
    return [msgpack.packb([a, b, None], use_bin_type=True) for a, b in bounds]


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    arr = np.ascontiguousarray(arr)
    payload = msgpack.packb([list(arr.shape), arr.dtype.name, arr.tobytes()], use_bin_type=True)
    return msgpack.ExtType(EXT_ARRAY, payload)


def _split(shape: tuple[int, ...], itemsize: int, max_chunk_bytes: Optional[int],
           expert_axis_chunks: int) -> list[tuple[tuple[int, int], ...]]:
    """Chunks of an array: optionally one per expert slice along axis 0, then
    halved along the largest axis until under `max_chunk_bytes`."""
    full = tuple((0, d) for d in shape)
    chunks = [full]
    if expert_axis_chunks > 1 and shape and shape[0] % expert_axis_chunks == 0:
        step = shape[0] // expert_axis_chunks
        chunks = [((i, i + step),) + full[1:] for i in range(0, shape[0], step)]
    if max_chunk_bytes:
        out = []
        while chunks:
            c = chunks.pop()
            dims = [b - a for a, b in c]
            if int(np.prod(dims)) * itemsize <= max_chunk_bytes or max(dims, default=1) <= 1:
                out.append(c)
                continue
            ax = int(np.argmax(dims))
            a, b = c[ax]
            mid = a + (b - a) // 2
            chunks += [c[:ax] + ((a, mid),) + c[ax + 1:], c[:ax] + ((mid, b),) + c[ax + 1:]]
        chunks = sorted(out)
    return chunks


def existing_checkpoint_files(prefix: str) -> list[str]:
    """`prefix.index` and `prefix.data-*` files that exist."""
    folder, stem = os.path.split(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, n) for n in os.listdir(folder)
                  if n == f"{stem}.index" or n.startswith(f"{stem}.data-"))


def write_reference_checkpoint(prefix: str, params: Mapping[str, np.ndarray], num_shards: int = 1,
                               max_chunk_bytes: Optional[int] = None,
                               expert_axis_chunks: int = 1, overwrite: bool = True) -> None:
    """Writes {'/'-joined name: array} in vmoe's native format, readable by
    `vmoe.checkpoints.partitioned.restore_checkpoint`.

    Args:
      num_shards: number of data files.
      max_chunk_bytes: split larger chunks (None: no limit).
      expert_axis_chunks: split arrays under a `/Moe/Mlp/` path into this many
        chunks along the expert axis, as an expert-sharded run would.
      overwrite: replace a checkpoint already at `prefix` (else FileExistsError
        before anything is written).
    Shards are written first and the index last, each atomically, so a
    reader never sees an index whose shards are not all complete; a failure
    part-way removes the shards this call wrote, and a successful overwrite
    removes the old checkpoint's other shards.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    before = existing_checkpoint_files(prefix)
    if before and not overwrite:
        raise FileExistsError(f"A checkpoint is already at {prefix!r} ({os.path.basename(before[0])}, ...); "
                              "pass overwrite=True (--overwrite) to replace it.")
    Path(os.path.dirname(os.path.abspath(prefix))).mkdir(parents=True, exist_ok=True)
    names = sorted(params, key=lambda n: n.split("/"))
    # jax's order: depth-first with sorted keys == sorting the split paths.
    shard_bytes = [0] * num_shards
    shard_content: list[dict[str, list]] = [dict() for _ in range(num_shards)]
    tree: dict[str, Any] = {}
    for leaf, name in enumerate(names):
        arr = np.asarray(params[name])
        per_expert = expert_axis_chunks if "/Moe/Mlp/" in f"/{name}" else 1
        chunks = _split(arr.shape, arr.itemsize, max_chunk_bytes, per_expert)
        shards = []
        for bounds in chunks:
            k = int(np.argmin(shard_bytes))
            region = arr[tuple(slice(a, b) for a, b in bounds)]
            shard_content[k].setdefault(str(leaf), []).append(
                [[_pack_array(region.reshape(-1))], msgpack.ExtType(EXT_NDSLICE, msgpack.packb(
                    _pack_slice(bounds), use_bin_type=True))])
            shard_bytes[k] += region.nbytes
            shards.append(k)
        shaped = msgpack.packb([list(arr.shape), arr.dtype.name, False, {}], use_bin_type=True)
        slices = [msgpack.packb(_pack_slice(b), use_bin_type=True) for b in chunks]
        info = msgpack.ExtType(EXT_INDEX_INFO, msgpack.packb([shaped, slices, shards], use_bin_type=True))
        node = tree
        parts = name.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = info
    written: list[str] = []
    try:
        for k in range(num_shards):
            doc = {MAGIC: True, **shard_content[k]}
            path = shard_path(prefix, k, num_shards)
            atomic_write_bytes(path, msgpack.packb(doc, use_bin_type=True))
            written.append(path)
            shard_content[k] = {}
        index = {"version": VERSION, "shard_count": num_shards, "index": tree}
        atomic_write_bytes(f"{prefix}.index", msgpack.packb(index, use_bin_type=True))
    except BaseException:
        for path in written:
            if os.path.abspath(path) not in before:
                os.unlink(path)
        raise
    new = {os.path.abspath(p) for p in written} | {os.path.abspath(f"{prefix}.index")}
    for stale in before:
        if stale not in new:
            os.unlink(stale)
