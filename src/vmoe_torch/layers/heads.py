"""Multi-head attention pooling (reference MapHead)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import CrossAttention
from .init import xavier_uniform_
from .mlp import Mlp


class MapHead(nn.Module):
    """A learned probe attends over all tokens; then y = Mlp(LN(x));
    returns (x + y)[:, 0]. (B, N, D) -> (B, D)."""

    def __init__(self, dim: int, mlp_dim: int, num_heads: int) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, dim))
        xavier_uniform_(self.probe, dim, dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.probe.expand(x.shape[0], -1, -1), x)
        return (x + self.mlp(self.norm(x)))[:, 0]
