"""Expert parallelism (the reference's "expert" mesh axis) on torch.distributed.

Conventions that make W processes compute exactly what one process computes
on the same global batch (tested for W = 1, 2, 4):

1. Data: rank r takes images [r*B/W, (r+1)*B/W) of the global batch of B.
   Routing groups are cut per rank, in order, so when (B/W)*N is a multiple
   of group_size the groups are exactly the single-process groups.
2. Router noise comes from a per-group seed (layer seed, global group index),
   never from a shared RNG stream, so it does not depend on W.
3. Each MoE layer's router is replicated; rank r holds experts
   [r*E/W, (r+1)*E/W). After routing its own groups, a rank has buffers
   (E, G*C, D); the E axis is cut into W chunks and exchanged with
   all_to_all_single, the local experts run on (E/W, W*G*C, D), and a second
   all_to_all returns the outputs (the backward runs both exchanges in
   reverse).
4. Gradients: replicated (non-expert) parameters are averaged over ranks
   with all_reduce; an expert's gradient already sums every rank's
   contribution (through the exchange) and is divided by W, which gives the
   gradient of the mean of the per-rank losses, i.e. of the global loss.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..moe.experts import Experts
from ..moe.layer import MoeMlp
from .comm import all_to_all, comm_device, exchange_counts

_EXPERT_KEYS = ("w1", "b1", "w2", "b2")


class ShardedExperts(nn.Module):
    """Drop-in for `Experts` holding this rank's E/W experts."""

    def __init__(self, full: Experts, group=None) -> None:
        super().__init__()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        _check_divides(full.num_experts, self.world)
        self.num_experts = full.num_experts
        self.local_experts = full.num_experts // self.world
        lo = self.rank * self.local_experts
        self.local = Experts(self.local_experts, full.dim, full.mlp_dim, full.dropout.p,
                             "tanh" if full.approximate == "tanh" else "erf")
        with torch.no_grad():
            for key in _EXPERT_KEYS:
                getattr(self.local, key).copy_(getattr(full, key)[lo:lo + self.local_experts])

    def forward(self, buffers: torch.Tensor) -> torch.Tensor:
        """(E, N, D) buffers of this rank's groups -> (E, N, D) expert outputs."""
        if torch.compiler.is_compiling():
            return self._forward_traceable(buffers)
        experts, n, dim = buffers.shape
        w, el = self.world, self.local_experts
        rows = el * n
        # 1. Rows each rank sends us (equal unless batches are uneven), exchanged once.
        recv_rows = exchange_counts([rows] * w, self.group)
        counts = [r // el for r in recv_rows]
        # 2. Chunk w of the expert axis (experts w*el ...) goes to rank w.
        recv = all_to_all(buffers.reshape(w * rows, dim), [rows] * w, recv_rows, group=self.group)
        parts = recv.split(recv_rows)
        x = torch.cat([p.reshape(el, c, dim) for p, c in zip(parts, counts)], dim=1)  # (el, sum N, D)
        y = self.local(x)
        # 3. Outputs go back the way they came.
        back = torch.cat([t.reshape(el * c, dim) for t, c in zip(y.split(counts, dim=1), counts)])
        out = all_to_all(back, recv_rows, [rows] * w, group=self.group)
        return out.reshape(experts, n, dim)

    def _forward_traceable(self, buffers: torch.Tensor) -> torch.Tensor:
        """`forward` under torch.compile: functional collectives (traced into
        the graph, with autograd), no exchange of buffer sizes. Assumes every
        rank of the group routes the same number of groups (as the trainer's
        equal per-rank micro-batches do); uneven batches need eager mode."""
        from torch.distributed import _functional_collectives as funcol
        experts, n, dim = buffers.shape
        w, el = self.world, self.local_experts
        group = self.group if self.group is not None else dist.group.WORLD
        assert group is not None, "a process group is initialised"
        recv = funcol.all_to_all_single_autograd(buffers.reshape(w * el * n, dim), None, None, group)
        x = recv.reshape(w, el, n, dim).transpose(0, 1).reshape(el, w * n, dim)  # (el, sum N, D)
        y = self.local(x)
        back = y.reshape(el, w, n, dim).transpose(0, 1).reshape(w * el * n, dim)
        out = funcol.all_to_all_single_autograd(back, None, None, group)
        return out.reshape(experts, n, dim)

    def forward_grouped(self, x: torch.Tensor, offsets: torch.Tensor, row_expert: torch.Tensor) -> torch.Tensor:
        """Dropless: (R, D) rows of this rank's groups sorted by (global)
        expert, `offsets` (E,) each expert's end row -> (R, D) outputs.

        Expert e lives on rank e // (E/W), so the rows for each rank are one
        contiguous run. The per-(rank, expert) row counts are exchanged first
        and read on the host: a variable-size all_to_all needs its split
        sizes there (one host sync per MoE layer, forward and backward
        share it; the capacity path has none). The received rows, ordered by
        source rank then expert, are put in expert order for the grouped
        matmuls and back, and return the way they came."""
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "Dropless experts with expert parallelism are not compiled: the variable-size exchange "
                "needs its split sizes on the host. Run this layer eagerly, or route with a capacity.")
        w, el = self.world, self.local_experts
        counts = torch.diff(offsets.long(), prepend=offsets.new_zeros(1).long())      # (E,) rows per expert
        device = comm_device(self.group)
        counts = counts.to(device)
        recv_counts = torch.empty(w * el, dtype=torch.long, device=device)
        dist.all_to_all_single(recv_counts, counts, group=self.group)             # (source, local expert)
        rows = torch.stack([counts.view(w, el).sum(1), recv_counts.view(w, el).sum(1)]).tolist()  # the host read
        send_rows, recv_rows = rows
        recv_matrix = recv_counts.view(w, el).to(x.device)
        recv = all_to_all(x, send_rows, recv_rows, group=self.group)               # (sum recv, D)
        # expert of each received row, then a stable sort into expert order
        expert_ids = torch.arange(el, device=x.device).repeat(w)
        row_local_expert = torch.repeat_interleave(expert_ids, recv_matrix.reshape(-1),
                                                   output_size=recv.shape[0])
        local_expert, order = torch.sort(row_local_expert, stable=True)
        local_offsets = recv_matrix.sum(0).cumsum(0).to(torch.int32)
        y_sorted = self.local.forward_grouped(recv.index_select(0, order), local_offsets, local_expert)
        y = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)            # back to arrival order
        return all_to_all(y, recv_rows, send_rows, group=self.group)


def _check_divides(num_experts: int, world: int) -> None:
    if num_experts % world:
        valid = [w for w in range(1, num_experts + 1) if num_experts % w == 0]
        raise ValueError(f"Expert parallelism needs the world size ({world}) to divide the number of "
                         f"experts ({num_experts}); valid world sizes: {valid}. Or run data parallel "
                         "(without --expert-parallel).")


def check_expert_parallel(model: nn.Module, world: int) -> None:
    """Raises before any work when `world` ranks cannot shard the experts."""
    for layer in _moe_layers(model):
        _check_divides(layer.num_experts, world)


def expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shards every MoE layer's experts over the ranks of `group` in place,
    and sets each layer's first global group index for per-group noise."""
    for layer in _moe_layers(model):
        layer.experts = ShardedExperts(layer.experts, group)  # type: ignore[assignment]
        layer.noise.shard = dist.get_rank(group)
    return model


def data_parallel(model: nn.Module, group=None) -> nn.Module:
    """Data parallelism (experts replicated): each MoE layer's first global
    group index moves by rank, so every rank draws the router noise of its own
    groups, as one process would on the whole batch (not the same noise on
    every rank)."""
    for layer in _moe_layers(model):
        layer.noise.shard = dist.get_rank(group)
    return model


def _moe_layers(model: nn.Module) -> list[MoeMlp]:
    return [m for m in model.modules() if isinstance(m, MoeMlp)]


def is_expert_param(name: str) -> bool:
    """Parameters of a sharded expert module (distinct on every rank)."""
    return ".experts.local." in f".{name}"


@torch.no_grad()
def sync_gradients(model: nn.Module, group=None) -> None:
    """Averages replicated gradients over ranks; scales expert gradients by 1/W."""
    world = dist.get_world_size(group)
    replicated = [p.grad for n, p in model.named_parameters()
                  if p.grad is not None and not is_expert_param(n)]
    if replicated:
        flat = torch.cat([g.reshape(-1) for g in replicated])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in replicated:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
    for n, p in model.named_parameters():
        if p.grad is not None and is_expert_param(n):
            p.grad /= world


def global_name(name: str) -> str:
    """A sharded model's name as the unsharded model names it:
    'blocks.1.mlp.experts.local.w1' -> 'blocks.1.mlp.experts.w1'; other
    names unchanged."""
    for key in _EXPERT_KEYS:
        suffix = f".experts.local.{key}"
        if name.endswith(suffix):
            return name[: -len(suffix)] + f".experts.{key}"
    return name


@torch.no_grad()
def gather_state_dict(model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """The full single-process state_dict (experts gathered from every rank),
    on every rank; names as in the unsharded model."""
    world = dist.get_world_size(group)
    out = {}
    for name, value in model.state_dict().items():
        if not is_expert_param(name):
            out[name] = value
            continue
        parts = [torch.empty_like(value) for _ in range(world)]
        dist.all_gather(parts, value.contiguous(), group=group)
        out[global_name(name)] = torch.cat(parts)
    return out


def shard_state_dict(full: dict[str, torch.Tensor], model: nn.Module, group=None) -> dict[str, torch.Tensor]:
    """Slices a full state_dict for this rank's sharded model (any W that
    divides E: checkpoints re-shard on load)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    out = {}
    for name in model.state_dict():
        if not is_expert_param(name):
            out[name] = full[name]
            continue
        tensor = full[global_name(name)]
        per = tensor.shape[0] // world
        out[name] = tensor[rank * per:(rank + 1) * per].clone()
    return out


@torch.no_grad()
def clip_grad_norm_distributed(model: nn.Module, max_norm: Optional[float], group=None) -> torch.Tensor:
    """Global-norm clipping over the whole (sharded) model, after
    `sync_gradients`: replicated gradients count once, every rank's experts
    count once. Returns the norm before clipping (0-dim float64 tensor);
    nothing here waits for the host."""
    replicated: list[torch.Tensor] = []
    experts: list[torch.Tensor] = []
    for n, p in model.named_parameters():
        if p.grad is not None:
            (experts if is_expert_param(n) else replicated).append(p.grad)
    def sq(gs: list[torch.Tensor]) -> torch.Tensor:
        return sum((g.double().square().sum() for g in gs), torch.zeros((), dtype=torch.float64))
    expert_sq = sq(experts)
    dist.all_reduce(expert_sq, group=group)
    total = (sq(replicated) + expert_sq).sqrt()
    if max_norm is not None:  # as torch's clip_grad_norm_: a coefficient clamped at 1
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in replicated + experts:
            g.mul_(scale.to(g.dtype))
    return total
