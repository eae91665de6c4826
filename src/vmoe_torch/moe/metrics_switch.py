"""Whether the routers compute their statistics: the per-group routing
metrics (dropped fraction, expert load, gate statistics, Soft MoE's
similarity metrics, the auxiliary losses whose weight is 0) cost passes over
the routing tensors that nothing needs unless someone reads them. They are
on by default (`model.metrics` after any forward holds them); the trainer
turns them off for the steps it does not log. The auxiliary losses that
enter the gradient, and the routing itself, are computed either way, so
training is the same to the bit.

A process-wide switch (one inference or training loop per process); a
compiled model specialises on it like on any Python flag.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

_ENABLED = True


def metrics_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def routing_metrics(enabled: bool = True) -> Iterator[None]:
    """Within the block, the routers compute their statistics iff `enabled`."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous
