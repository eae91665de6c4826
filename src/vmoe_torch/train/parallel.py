"""The parallel mode of a run, chosen once from the config and the world
size: one object owns wrapping the model, gradient sync and clipping,
cross-rank reductions, and the checkpoint layout. The trainer asks it; it
never tests mode flags itself.

| mode            | model                               | checkpoint layout     |
|-----------------|-------------------------------------|-----------------------|
| SingleProcess   | as built                            | full (safetensors)    |
| DataParallel    | replicated, gradients all-reduced   | full, written by rank 0 |
| ExpertParallel  | experts split over the ranks        | sharded (DCP)         |
| Fsdp            | FSDP2, experts over "ep" of a mesh  | sharded (DCP)         |
"""
from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..config.experiment import TrainConfig
from ..distributed.comm import comm_device
from ..distributed.expert_parallel import (
    check_expert_parallel,
    clip_grad_norm_distributed,
    data_parallel,
    expert_parallel,
    sync_gradients,
)
from ..storage.workdir import checkpoint_dir
from ..utils.errors import RunRefused, mark_agreed
from .checkpoint import save_checkpoint, save_sharded_checkpoint
from .optim import clip_grad_norm

T = TypeVar("T")


def _fsdp() -> Any:
    """`distributed.fsdp`, imported by the FSDP mode only: FSDP2 and DTensor
    cost about 0.5 s of every process's start-up."""
    from ..distributed import fsdp
    return fsdp


class ParallelMode:
    """One process; the base of the others. `rank`/`world` of the process
    group (0/1 here)."""

    name = "single"
    sharded = False  # the model state is spread over the ranks (sharded checkpoints)
    expert_parallel = False  # recorded in state.json
    fsdp = False
    expert_shards = 1

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world

    @property
    def lead(self) -> bool:
        """The rank that logs, evaluates and writes unsharded files."""
        return self.rank == 0

    def check(self, model: nn.Module) -> None:
        """Raises before any work when `model` cannot run in this mode."""

    def compiles_whole_model(self) -> bool:
        """train.compile compiles the whole forward (else each block, after wrapping)."""
        return True

    def wrap(self, model: nn.Module, compile_options: Optional[dict[str, Any]] = None) -> None:
        """Shards or replicates `model` in place."""

    def clip_gradients(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        """Synchronises the gradients of one step and clips them to `max_norm`
        (global norm); returns the norm before clipping."""
        return clip_grad_norm(model, max_norm)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over the ranks (collective)."""
        if self.world == 1:
            return value
        dist.all_reduce(value)
        return value / self.world

    def agree_max(self, value: int) -> int:
        """The largest `value` of any rank (collective): a stop every rank takes."""
        if self.world == 1:
            return value
        flag = torch.tensor([value], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def agree(self, work: Callable[[], T]) -> T:
        """Runs `work` on this rank; when it raised on any rank, every rank
        raises (collective): its own error, or one naming the rank that
        failed. Each such error is marked as agreed (`utils.errors`), so every
        rank then leaves together; without this a rank that fails alone
        leaves its peers waiting in their next collective. Put it around work
        that every rank reaches (set-up, the work-dir lock)."""
        if self.world == 1:
            return work()
        result: Optional[T] = None
        error: Optional[Exception] = None
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
        reports: list[Optional[str]] = [None] * self.world
        dist.all_gather_object(reports, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if error is not None:
            raise mark_agreed(error)
        if failed:
            r, message = failed[0]
            raise mark_agreed(RunRefused(f"rank {r} failed: {message}"))
        return result  # type: ignore[return-value]

    def save(self, workdir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
             extra: dict[str, Any], keep: int, files: dict[str, Any]) -> str:
        """Checkpoint `step` in this mode's layout; returns its directory."""
        extra = {**extra, **self.record()}
        if self.sharded:
            return save_sharded_checkpoint(workdir, step, model, optimizer, extra, keep, files)
        if self.lead:
            save_checkpoint(workdir, step, model.state_dict(), optimizer.state_dict(), extra, keep, files)
        self.barrier()
        return checkpoint_dir(workdir, step)

    def record(self) -> dict[str, Any]:
        """What state.json records of the mode."""
        return {"world_size": self.world, "expert_parallel": self.expert_parallel, "fsdp": self.fsdp,
                "expert_shards": self.expert_shards}


class DataParallel(ParallelMode):
    """Replicated model; gradients averaged over the ranks after backward."""

    name = "data_parallel"

    def wrap(self, model: nn.Module, compile_options: Optional[dict[str, Any]] = None) -> None:
        data_parallel(model)

    def clip_gradients(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        sync_gradients(model)
        return clip_grad_norm_distributed(model, max_norm)


class ExpertParallel(DataParallel):
    """Each rank holds E/W experts; tokens travel by all_to_all."""

    name = "expert_parallel"
    sharded = True
    expert_parallel = True

    def check(self, model: nn.Module) -> None:
        check_expert_parallel(model, self.world)

    def wrap(self, model: nn.Module, compile_options: Optional[dict[str, Any]] = None) -> None:
        expert_parallel(model)


class Fsdp(ParallelMode):
    """FSDP2 over all ranks for the dense parameters; experts sharded over
    the "ep" axis (`expert_shards` ranks) of a ("dp", "ep") mesh."""

    name = "fsdp"
    sharded = True
    fsdp = True

    def __init__(self, rank: int, world: int, expert_shards: int, device_type: str) -> None:
        super().__init__(rank, world)
        self.expert_shards, self.device_type = expert_shards, device_type
        self.expert_parallel = expert_shards > 1

    def check(self, model: nn.Module) -> None:
        if self.world % self.expert_shards:
            raise ValueError(f"train.expert_shards={self.expert_shards} must divide the world size "
                             f"{self.world}.")
        check_expert_parallel(model, self.expert_shards)

    def compiles_whole_model(self) -> bool:
        return False  # each block after fully_shard, FSDP's hooks between blocks staying eager

    def wrap(self, model: nn.Module, compile_options: Optional[dict[str, Any]] = None) -> None:
        _fsdp().fsdp_expert_parallel(model, _fsdp().parallel_mesh(self.expert_shards, self.device_type))
        if compile_options is not None:
            for block in model.blocks:  # type: ignore[union-attr]
                block.compile(**compile_options)

    def clip_gradients(self, model: nn.Module, max_norm: Optional[float]) -> torch.Tensor:
        _fsdp().sync_expert_gradients(model)  # FSDP averaged the non-expert gradients in backward
        return _fsdp().clip_grad_norm_fsdp(model, max_norm)


def choose_mode(train: TrainConfig, rank: int, world: int, device: torch.device) -> ParallelMode:
    """The one place that reads the parallel-mode settings."""
    if world == 1:
        return ParallelMode()
    if train.fsdp:
        shards = train.expert_shards or (world if train.expert_parallel else 1)
        return Fsdp(rank, world, shards, device.type)
    if train.expert_parallel:
        return ExpertParallel(rank, world)
    return DataParallel(rank, world)
