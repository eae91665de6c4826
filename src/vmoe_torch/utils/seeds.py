"""Deterministic seed derivation: one rule for every per-step, per-group and
per-item RNG stream, so runs are reproducible and independent of how the work
is split across processes.

`derive_seed(base, *parts)` folds each part in with `base * 1_000_003 + part`
(a prime multiplier, so distinct (base, part) pairs stay distinct for the
ranges used here). Every caller's seeds are exactly those of earlier versions.
"""
from __future__ import annotations

SEED_PRIME = 1_000_003


def derive_seed(base: int, *parts: int) -> int:
    """base, p1, p2, ... -> ((base * P + p1) * P + p2) ...  with P = 1_000_003."""
    seed = base
    for part in parts:
        seed = seed * SEED_PRIME + part
    return seed
