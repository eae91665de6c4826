"""An autograd-aware all_to_all (backward = the reverse exchange)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.send),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send,
                               input_split_sizes=ctx.recv, group=ctx.group)
        return out, None, None, None


def comm_device(group=None) -> torch.device:
    """Where tensors for collectives of `group` must live: the current GPU
    under NCCL (it exchanges device tensors only), else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_counts(send: list[int], group=None) -> list[int]:
    """1. Tell every rank how many rows it will receive from us (uneven buffers)."""
    world = dist.get_world_size(group)
    device = comm_device(group)
    send_t = torch.tensor(send, dtype=torch.long, device=device)
    recv_t = torch.empty(world, dtype=torch.long, device=device)
    dist.all_to_all_single(recv_t, send_t, group=group)
    return recv_t.tolist()


def all_to_all(x: torch.Tensor, send: list[int], recv: Optional[list[int]] = None, group=None) -> torch.Tensor:
    """Sends rows send[0] to rank 0, the next send[1] to rank 1, ...; returns
    the rows received, ordered by source rank. `recv` (rows from each rank)
    is exchanged first when not given."""
    if recv is None:
        recv = exchange_counts(send, group)
    return _AllToAll.apply(x, list(send), list(recv), group)
