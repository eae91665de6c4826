"""The one rule for comparing a state with what a model expects: every
missing, unexpected and mis-shaped entry is named (no silent partial loads);
and the one refusal of writing a diverged (NaN / Inf) model."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch


def state_mismatch(expected: Mapping[str, Sequence[int]], found: Mapping[str, Sequence[int]],
                   what: str = "checkpoint") -> str:
    """'' when `found` has exactly the names and shapes of `expected`, else
    one line per kind of difference."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: {what} {tuple(found[k])} vs model {tuple(expected[k])}"
              for k in sorted(set(expected) & set(found)) if tuple(found[k]) != tuple(expected[k])]
    return ((f"\n  missing in {what}: {missing}" if missing else "")
            + (f"\n  not in the model: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatches: {shapes}" if shapes else ""))


def refuse_nonfinite(state: Mapping[str, Any], target: str) -> None:
    """Raises ValueError naming the floating-point entries of `state`
    (tensors or arrays) that hold NaN or Inf: a diverged model is not written
    to `target` unless the caller was asked to (`allow_nonfinite=True`)."""
    def finite(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return not v.is_floating_point() or bool(torch.isfinite(v).all())
        arr = np.asarray(v)
        return not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())
    bad = [k for k, v in state.items() if not finite(v)]
    if bad:
        raise ValueError(f"{len(bad)} tensors hold NaN or Inf values ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}): the model diverged. Nothing was written to "
                         f"{target!r}; pass allow_nonfinite=True to write it anyway.")
