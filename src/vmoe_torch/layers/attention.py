"""Multi-head dot-product attention (flax MultiHeadDotProductAttention):
scores q.k / sqrt(head_dim), softmax over keys."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .init import xavier_uniform_


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, D) -> (B, heads, N, D / heads)."""
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, heads, N, hd) -> (B, N, heads * hd)."""
    b, h, n, hd = x.shape
    return x.transpose(1, 2).reshape(b, n, h * hd)


class Attention(nn.Module):
    """Self-attention with a fused q/k/v projection `qkv` (D -> 3D) and `proj`.

    `qk_norm`: LayerNorm (scale only, eps 1e-6, over the head dimension,
    shared by all heads) on queries and keys, as flax's `normalize_qk` (the
    reference's `attention_qk_norm`, used by its Soft MoE models).
    """

    def __init__(self, dim: int, num_heads: int, attention_dropout_rate: float = 0.0,
                 qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6, bias=False) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6, bias=False) if qk_norm else None
        self.attn_drop = attention_dropout_rate
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        for i in range(3):  # each of q, k, v initialised as its own Dense
            xavier_uniform_(self.qkv.weight.data[i * dim:(i + 1) * dim], dim, dim)
        xavier_uniform_(self.proj.weight, dim, dim)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, N, D) -> (B, N, D)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.num_heads
        q, k = _heads(q, h), _heads(k, h)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(
            q, k, _heads(v, h), dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(_merge(out))


class CrossAttention(nn.Module):
    """Attention of queries `xq` over `xkv`: `q` (D -> D), `kv` (D -> 2D), `proj`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        xavier_uniform_(self.q.weight, dim, dim)
        for i in range(2):
            xavier_uniform_(self.kv.weight.data[i * dim:(i + 1) * dim], dim, dim)
        xavier_uniform_(self.proj.weight, dim, dim)
        for lin in (self.q, self.kv, self.proj):
            nn.init.zeros_(lin.bias)

    def forward(self, xq: Tensor, xkv: Tensor) -> Tensor:
        """(B, M, D), (B, N, D) -> (B, M, D)."""
        k, v = self.kv(xkv).chunk(2, dim=-1)
        h = self.num_heads
        out = F.scaled_dot_product_attention(_heads(self.q(xq), h), _heads(k, h), _heads(v, h))
        return self.proj(_merge(out))
