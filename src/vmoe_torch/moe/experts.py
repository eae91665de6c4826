"""E expert MLPs (Dense-GELU-Dense) stored as stacked parameters and applied
with batched matmuls. Kernels keep the reference layout (E, in, out)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.init import xavier_uniform_


class Experts(nn.Module):
    """Batched expert MLPs.

    Parameters: `w1 (E, D, H)`, `b1 (E, H)`, `w2 (E, H, D)`, `b2 (E, D)`.
    The kernels (weight-decayed, see `vmoe_torch.layers.roles`) are w1, w2.
    """

    kernel_params = ("w1", "w2")

    def __init__(self, num_experts: int, dim: int, mlp_dim: int,
                 dropout_rate: float = 0.0, gelu: str = "tanh") -> None:
        super().__init__()
        self.approximate = "tanh" if gelu == "tanh" else "none"
        self.num_experts, self.dim, self.mlp_dim = num_experts, dim, mlp_dim
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, mlp_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, mlp_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, mlp_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.dropout = nn.Dropout(dropout_rate)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # vit_jax MlpBlock: xavier_uniform kernels, normal(1e-6) biases.
        for w in (self.w1, self.w2):
            xavier_uniform_(w, w.shape[1], w.shape[2])
        for b in (self.b1, self.b2):
            nn.init.normal_(b, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        """(E, N, D) -> (E, N, D)."""
        h = torch.baddbmm(self.b1.unsqueeze(1).to(x.dtype), x, self.w1.to(x.dtype))
        h = self.dropout(F.gelu(h, approximate=self.approximate))
        return self.dropout(torch.baddbmm(self.b2.unsqueeze(1).to(h.dtype), h, self.w2.to(h.dtype)))

    def forward_grouped(self, x: Tensor, offsets: Tensor, row_expert: Tensor) -> Tensor:
        """(R, D) rows sorted by expert -> (R, D). Expert e takes rows
        [offsets[e-1], offsets[e]); `row_expert` (R,) names each row's expert.

        Uses `torch.nn.functional.grouped_mm` where this torch has it (no
        host sync; CPU float32/bfloat16, CUDA bfloat16); elsewhere a loop over
        the experts' segments, which reads the segment sizes on the host.
        Under torch.compile only bfloat16 rows are supported (torch's
        compiled grouped_mm)."""
        if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
            raise NotImplementedError(
                f"Dropless experts under torch.compile need bfloat16 rows, got {x.dtype}: torch's compiled "
                "grouped_mm takes bfloat16 only. Run the dropless layer eagerly, or route with a capacity.")
        if _grouped_mm_ok(x):
            h = F.grouped_mm(x, self.w1.to(x.dtype), offs=offsets)
            h = h + self.b1.index_select(0, row_expert).to(h.dtype)
            h = self.dropout(F.gelu(h, approximate=self.approximate))
            y = F.grouped_mm(h, self.w2.to(h.dtype), offs=offsets)
            return self.dropout(y + self.b2.index_select(0, row_expert).to(y.dtype))
        sizes = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
        # unbind: one stacked gradient per parameter in the backward, not E full-size ones
        w1, b1, w2, b2 = (p.to(x.dtype).unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        outs = []
        for e, part in enumerate(x.split(sizes)):
            h = self.dropout(F.gelu(torch.addmm(b1[e], part, w1[e]), approximate=self.approximate))
            outs.append(self.dropout(torch.addmm(b2[e], h, w2[e])))
        return torch.cat(outs)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, mlp_dim={self.mlp_dim}"


def _grouped_mm_ok(x: Tensor) -> bool:
    """Whether F.grouped_mm serves x's device and dtype in this torch."""
    if not hasattr(F, "grouped_mm"):
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.device.type == "cuda" and x.dtype == torch.bfloat16
