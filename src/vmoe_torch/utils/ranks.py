"""Which process speaks under torchrun: warnings about the run (not about
one process's own state) are given once, by rank 0, as error messages are."""
from __future__ import annotations

import os
import warnings


def rank() -> int:
    """This process's rank: the default process group's, else torchrun's
    RANK (0 outside torchrun)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def warn_once(message: str, category: type[Warning] = UserWarning, stacklevel: int = 2) -> None:
    """`warnings.warn` on rank 0 only (every rank sees the same work dir and
    config, so the other ranks' copies would only repeat it)."""
    if rank() == 0:
        warnings.warn(message, category, stacklevel=stacklevel + 1)
