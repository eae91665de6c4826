"""Gathers whose backward is a gather too: token permutation with both
index maps, as megablocks' and torchtitan's MoE permutations do.

A dispatcher moves rows with a map `index` (M,) from destination rows to
source rows, and knows the inverse map `inverse` (N, R): for each source
row, the R destination rows that read it. The forward gathers through
`index`; the backward gathers the output gradient through `inverse` and
sums its R rows, instead of scattering (index_add) it back. A scatter
needs atomic adds wherever it runs in parallel (inductor's CPU kernels,
CUDA), and on CUDA their order, hence the rounding, changes from run to
run; a gather needs neither.

Index convention: the value N in `index` (M in `inverse`) stands for a row
of zeros, so a missing source (an empty buffer slot) or destination (a
dropped choice) reads zeros with no masking pass. For R <= 2 the summed
gradient equals, to the bit, what the scatter's backward computes (two
terms added to a zero in either order).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def padded_gather(src: Tensor, index: Tensor) -> Tensor:
    """(N, D) rows and (...,) indices in [0, N] -> (..., D) rows; index N
    reads zeros."""
    dim = src.shape[-1]
    rows = torch.cat([src, src.new_zeros(1, dim)]).index_select(0, index.reshape(-1))
    return rows.view(*index.shape, dim)


def gather_sum(src: Tensor, index: Tensor) -> Tensor:
    """(N, D) rows and (B, R) indices in [0, N] -> (B, D): each row the sum
    of its R rows of src, index N adding nothing.

    float32/float64: one pass (`embedding_bag`, sum mode) that reads and
    adds the R rows with no (B, R, D) intermediate. Index N becomes row 0
    with weight 0 (exact: 0/1 weights change no bit), so only a non-finite
    row 0 could reach a row that skips it; in a backward pass that row's
    gradient is already in the experts' gradients, and the step is
    non-finite either way. Other dtypes gather and sum in float32 with one
    round-to-nearest-even at the end (embedding_bag's bfloat16 output
    breaks ties another way).
    """
    if src.shape[0] == 0:
        return src.new_zeros(index.shape[0], src.shape[-1])
    if src.dtype not in (torch.float32, torch.float64):
        rows = padded_gather(src, index)
        return rows[:, 0] if rows.shape[1] == 1 else rows.sum(1)
    valid = index < src.shape[0]
    return F.embedding_bag(torch.where(valid, index, 0), src, mode="sum",
                           per_sample_weights=valid.to(src.dtype))


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[2])


def _backward(ctx: Any, grad: Tensor) -> tuple:
    (inverse,) = ctx.saved_tensors
    return torch.ops.vmoe_torch.gather_sum(grad, inverse), None, None


def _gather_sum_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(inputs[1])
    ctx.rows = inputs[0].shape[0]


def _gather_sum_backward(ctx: Any, grad: Tensor) -> tuple:
    # Only second-order gradients come here (gradient penalties, Hessian
    # products): the transpose of gather_sum, a scatter-add, plain torch.
    (index,) = ctx.saved_tensors
    out = grad.new_zeros(ctx.rows + 1, grad.shape[-1])
    out = out.index_add(0, index.reshape(-1), grad.repeat_interleave(index.shape[1], 0))
    return out[:ctx.rows], None


def _register_ops() -> bool:
    """Registers `vmoe_torch::paired_gather` and `vmoe_torch::gather_sum` as
    torch custom operators: opaque to torch.compile (which calls them as
    they are, with no atomic scatter and no tracing into an autograd
    Function under dynamic shapes), with their backward passes registered
    (gather_sum's, used only for second-order gradients, a scatter-add).
    False on a torch without `torch.library.custom_op` (< 2.4)."""
    if not hasattr(torch.library, "custom_op"):
        return False
    library = torch.library

    @library.custom_op("vmoe_torch::gather_sum", mutates_args=())
    def gather_sum_op(src: Tensor, index: Tensor) -> Tensor:
        return gather_sum(src, index)

    @gather_sum_op.register_fake
    def _(src: Tensor, index: Tensor) -> Tensor:
        return src.new_empty(index.shape[0], src.shape[-1])

    @library.custom_op("vmoe_torch::paired_gather", mutates_args=())
    def paired_gather_op(src: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        return padded_gather(src, index)

    @paired_gather_op.register_fake
    def _(src: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        return src.new_empty(index.shape[0], src.shape[-1])

    paired_gather_op.register_autograd(_backward, setup_context=_setup_context)
    gather_sum_op.register_autograd(_gather_sum_backward, setup_context=_gather_sum_setup_context)
    return True


_OPS = _register_ops()


def paired_gather(src: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
    """(N, D) source rows -> (M, D) rows `[src; 0][index]`.

    Args:
      src: (N, D) rows.
      index: (M,) int64 source row of each output row, N for a zero row.
      inverse: (N, R) int64 output rows that read each source row, M where
        fewer than R do; must be the exact inverse of `index`.
    Returns:
      (M, D). Its gradient w.r.t. src is `gather_sum(grad, inverse)`: a
      gather-and-add per source row, where torch's own index_select would
      scatter-add.
    Without gradients (inference), under torch.export (whose graphs, ONNX
    among them, keep to ATen operators) or on a torch older than 2.4, this
    is the plain gather, whose backward is torch's scatter-add.
    """
    if _OPS and torch.is_grad_enabled() and src.requires_grad and not _exporting():
        return torch.ops.vmoe_torch.paired_gather(src, index, inverse)
    return padded_gather(src, index)


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())
