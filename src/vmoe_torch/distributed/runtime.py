"""Process-group set-up under torchrun."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


def local_device(device: torch.device) -> torch.device:
    """This process's device: under torchrun a CUDA run takes GPU LOCAL_RANK
    of its node (and makes it current, as NCCL requires); anything else is
    returned unchanged."""
    if device.type != "cuda" or device.index is not None or "LOCAL_RANK" not in os.environ:
        return device
    index = int(os.environ["LOCAL_RANK"])
    if index >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={index} but this node has {torch.cuda.device_count()} GPUs: start at most "
                         "that many processes per node (torchrun --nproc-per-node).")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


_AGENT_PID: Optional[int] = None


def watch_agent() -> None:
    """Records this worker's parent, the torchrun agent (under torchrun only).
    Workers run in their own sessions, so a SIGKILLed agent leaves them
    training; `agent_gone` lets the training loop notice (the parent pid
    changes when the parent dies) and stop as on SIGTERM."""
    global _AGENT_PID
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        _AGENT_PID = os.getppid()


def agent_gone() -> bool:
    """Whether the torchrun agent that started this worker has died (one
    getppid() call; False outside torchrun)."""
    return _AGENT_PID is not None and os.getppid() != _AGENT_PID


def init_from_env(device: torch.device) -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE > 1) initialises the
    default process group: gloo on the CPU, NCCL on CUDA (pass the device
    from `local_device`, so that each process has its own GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    watch_agent()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        rank = int(os.environ["RANK"])
        # After a torchrun restart, the store still holds the failed attempt's
        # keys (e.g. gloo peer addresses); a per-attempt prefix keeps the new
        # workers from trying to connect to dead processes.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=False if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                              else rank == 0, timeout=timedelta(minutes=10))
        dist.init_process_group(backend, store=dist.PrefixStore(f"vmoe/attempt{attempt}", store),
                                rank=rank, world_size=world, timeout=timedelta(minutes=10))
    return dist.get_rank(), dist.get_world_size()


def shutdown(synchronize: bool = False) -> None:
    """Destroys the default process group, if any. A process that exits with
    a live gloo group can abort at interpreter shutdown ("terminate called
    without an active exception": the group's threads are still joinable when
    they are destroyed), so every torchrun entry point ends with this. With
    `synchronize` (the success path) the ranks first meet at a barrier, so no
    rank tears its connections down while a peer is still using them."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()
