"""Name and layout mapping between the reference's flat parameter names
('Encoder/encoderblock_1/Moe/Mlp/Dense_0/kernel') and our state_dict.

Only parameter names and array layouts live here, no model code. Layout
rules (the Flax -> PyTorch transposes):
  Dense kernel (in, out)                  -> Linear.weight (out, in)
  Conv kernel HWIO (ph, pw, 3, D)         -> Conv2d.weight OIHW (D, 3, ph, pw)
  attention q/k/v kernel (D, heads, hd)   -> rows of the fused qkv weight
  attention out kernel (heads, hd, D)     -> proj.weight (D, heads*hd)
  expert kernels (E, in, out)             -> kept as is (batched matmul layout)
  router kernel (D, E)                    -> router.weight (E, D)
  E^3 router kernel (D, M, E/M)           -> router.weight (E, D), member m's
                                             experts in rows m*E/M ...
  Soft MoE Router/mu (D, E, p), scale ()  -> router.mu, router.scale (as is)
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import numpy as np

Array = np.ndarray


def _dense_w(a: Array) -> Array:
    return a.T


def _attn_in_w(a: Array) -> Array:          # (D, h, hd) -> (h*hd, D)
    return a.reshape(a.shape[0], -1).T


def _attn_in_b(a: Array) -> Array:          # (h, hd) -> (h*hd,)
    return a.reshape(-1)


def _attn_out_w(a: Array) -> Array:         # (h, hd, D) -> (D, h*hd)
    return a.reshape(-1, a.shape[-1]).T


def _router_w(a: Array) -> Array:          # (D, E) or (D, M, E/M) -> (E, D)
    return a.reshape(a.shape[0], -1).T


def _conv_w(a: Array) -> Array:             # HWIO -> OIHW
    return a.transpose(3, 2, 0, 1)


def _same(a: Array) -> Array:
    return a


# Each rule: reference-name regex -> (our name template, transform, inverse, fused_part).
# fused_part = (slot, num_slots) for q/k/v (and k/v) parts of a fused torch weight.
Rule = tuple[str, str, Callable[[Array], Array], tuple[int, int] | None]

_LINEAR = [("kernel", "weight", _dense_w), ("bias", "bias", _same)]
_NORM = [("scale", "weight", _same), ("bias", "bias", _same)]


def _rules() -> list[Rule]:
    rules: list[Rule] = [
        (r"embedding/kernel", "patch_embed.proj.weight", _conv_w, None),
        (r"embedding/bias", "patch_embed.proj.bias", _same, None),
        (r"cls", "cls_token", _same, None),
        (r"Encoder/posembed_input/pos_embedding", "pos_embed", _same, None),
        (r"Encoder/encoder_norm/scale", "norm.weight", _same, None),
        (r"Encoder/encoder_norm/bias", "norm.bias", _same, None),
        (r"MapHead/probe", "map_head.probe", _same, None),
    ]
    blk = r"Encoder/encoderblock_(\d+)"
    for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
        for src, dst, f in _NORM:
            rules.append((rf"{blk}/{ln}/{src}", rf"blocks.\1.{ours}.{dst}", f, None))
    for i, part in enumerate(("query", "key", "value")):
        rules.append((rf"{blk}/SelfAttention/{part}/kernel", r"blocks.\1.attn.qkv.weight", _attn_in_w, (i, 3)))
        rules.append((rf"{blk}/SelfAttention/{part}/bias", r"blocks.\1.attn.qkv.bias", _attn_in_b, (i, 3)))
    for part, ours in (("query_ln", "q_norm"), ("key_ln", "k_norm")):
        rules.append((rf"{blk}/SelfAttention/{part}/scale", rf"blocks.\1.attn.{ours}.weight", _same, None))
    rules.append((rf"{blk}/SelfAttention/out/kernel", r"blocks.\1.attn.proj.weight", _attn_out_w, None))
    rules.append((rf"{blk}/SelfAttention/out/bias", r"blocks.\1.attn.proj.bias", _same, None))
    for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
        for src, dst, f in _LINEAR:
            rules.append((rf"{blk}/Mlp/{dense}/{src}", rf"blocks.\1.mlp.{fc}.{dst}", f, None))
            rules.append((rf"MapHead/Mlp/{dense}/{src}", rf"map_head.mlp.{fc}.{dst}", f, None))
    for dense, w, b in (("Dense_0", "w1", "b1"), ("Dense_1", "w2", "b2")):
        rules.append((rf"{blk}/Moe/Mlp/{dense}/kernel", rf"blocks.\1.mlp.experts.{w}", _same, None))
        rules.append((rf"{blk}/Moe/Mlp/{dense}/bias", rf"blocks.\1.mlp.experts.{b}", _same, None))
    rules.append((rf"{blk}/Moe/Router/dense/kernel", r"blocks.\1.mlp.router.weight", _router_w, None))
    rules.append((rf"{blk}/Moe/Router/mu", r"blocks.\1.mlp.router.mu", _same, None))
    rules.append((rf"{blk}/Moe/Router/scale", r"blocks.\1.mlp.router.scale", _same, None))
    mh = "MapHead/MultiHeadDotProductAttention"
    rules.append((rf"{mh}/query/kernel", "map_head.attn.q.weight", _attn_in_w, None))
    rules.append((rf"{mh}/query/bias", "map_head.attn.q.bias", _attn_in_b, None))
    for i, part in enumerate(("key", "value")):
        rules.append((rf"{mh}/{part}/kernel", "map_head.attn.kv.weight", _attn_in_w, (i, 2)))
        rules.append((rf"{mh}/{part}/bias", "map_head.attn.kv.bias", _attn_in_b, (i, 2)))
    rules.append((rf"{mh}/out/kernel", "map_head.attn.proj.weight", _attn_out_w, None))
    rules.append((rf"{mh}/out/bias", "map_head.attn.proj.bias", _same, None))
    for src, dst, f in _NORM:
        rules.append((rf"MapHead/LayerNorm/{src}", f"map_head.norm.{dst}", f, None))
    for layer in ("pre_logits", "head"):
        for src, dst, f in _LINEAR:
            rules.append((rf"{layer}/{src}", f"{layer}.{dst}", f, None))
    return rules


RULES = [(re.compile(f"^{src}$"), dst, f, part) for src, dst, f, part in _rules()]


def map_reference_name(name: str, arr: Array) -> Optional[tuple[str, Array, Optional[tuple[int, int]]]]:
    """(our name, array in our layout, (slot, num_slots) of a fused weight or
    None) for one reference array; None when no rule maps `name`."""
    for pattern, dst, f, part in RULES:
        m = pattern.match(name)
        if m:
            out = f(np.asarray(arr))
            # ascontiguousarray turns 0-d arrays (Soft MoE's scale) into 1-d ones.
            return m.expand(dst), np.ascontiguousarray(out).reshape(out.shape), part
    return None


def reference_to_torch(params: dict[str, Array]) -> dict[str, Array]:
    """Maps a flat reference parameter dict to our state_dict names/layouts.

    Raises ValueError listing every reference name no rule maps, and any
    fused weight with a missing part (no silent partial loads).
    """
    out: dict[str, Array] = {}
    fused: dict[str, dict[int, Array]] = {}
    fused_n: dict[str, int] = {}
    unmapped = []
    for name, arr in params.items():
        mapped = map_reference_name(name, arr)
        if mapped is None:
            unmapped.append(name)
            continue
        target, value, part = mapped
        if part is None:
            out[target] = value
        else:
            fused.setdefault(target, {})[part[0]] = value
            fused_n[target] = part[1]
    if unmapped:
        raise ValueError(f"Reference parameters with no mapping: {sorted(unmapped)}.")
    for target, parts in fused.items():
        if len(parts) != fused_n[target]:
            raise ValueError(f"Fused weight {target!r} is missing parts "
                             f"{sorted(set(range(fused_n[target])) - set(parts))} (q/k/v).")
        out[target] = np.concatenate([parts[i] for i in range(fused_n[target])], axis=0)
    return out


def torch_to_reference(state: dict[str, Array], num_heads: int,
                       ensemble_size: int = 1) -> dict[str, Array]:
    """Inverse of `reference_to_torch` (for exporting to the native format);
    `ensemble_size` M > 1 writes E^3 router kernels as (D, M, E/M)."""
    out: dict[str, Array] = {}
    used = set()
    for pattern, dst, f, part in RULES:
        src_template = pattern.pattern[1:-1]
        dst_re = re.compile("^" + re.escape(dst).replace(r"\\1", r"(\d+)") + "$")
        for name, value in state.items():
            m = dst_re.match(name)
            if not m:
                continue
            value = np.asarray(value)
            if part is not None:
                value = np.split(value, part[1], axis=0)[part[0]]
            src = src_template.replace(r"(\d+)", m.group(1)) if m.groups() else src_template
            out[src] = _invert(f, value, num_heads, src, ensemble_size)
            used.add(name)
    missing = sorted(set(state) - used)
    if missing:
        raise ValueError(f"Parameters with no reference name: {missing}.")
    return out


def _invert(f: Callable[[Array], Array], a: Array, num_heads: int, name: str,
            ensemble_size: int = 1) -> Array:
    if f is _same:
        return a
    if f is _router_w:                      # (E, D) -> (D, E) or (D, M, E/M)
        kernel = np.ascontiguousarray(a.T)
        return kernel if ensemble_size == 1 else kernel.reshape(a.shape[1], ensemble_size, -1)
    if f is _dense_w:
        return np.ascontiguousarray(a.T)
    if f is _conv_w:
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    if f is _attn_in_w:                     # (h*hd, D) -> (D, h, hd)
        return np.ascontiguousarray(a.T.reshape(a.shape[1], num_heads, -1))
    if f is _attn_in_b:
        return a.reshape(num_heads, -1)
    if f is _attn_out_w:                    # (D, h*hd) -> (h, hd, D)
        return np.ascontiguousarray(a.T.reshape(num_heads, -1, a.shape[0]))
    raise AssertionError(f"no inverse for {name}")
