"""The one rule for comparing a state with what a model expects: every
missing, unexpected and mis-shaped entry is named (no silent partial loads)."""
from __future__ import annotations

from typing import Mapping, Sequence


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
