"""Pre-LN encoder block with an injected MLP (timm's `mlp_layer` pattern).

The block does not know what its MLP is. An MLP module whose class sets
`returns_metrics = True` (every MoE kind) is called as `mlp(x, noise=...)`
and returns `(y, metrics)`; the block keeps the metrics in `self.metrics`,
so that hooks and wrappers only ever see tensors. Any other MLP is called as
`mlp(x)` and returns `y`.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from ..utils.transient import Transient
from .attention import Attention

Metrics = dict[str, Tensor]


def _nothing() -> None:
    return None


class Block(nn.Module):
    """x + Attn(LN(x)), then x + Mlp(LN(x)); (B, N, D) -> (B, N, D).

    Args:
      dim: D. num_heads: attention heads.
      mlp_layer: builds the MLP; called once, after the attention and the
        norms exist (so parameter initialisation draws in a fixed order).
      drop_path_rate: stochastic depth on both residual branches.
      dropout_rate: dropout after attention. attention_dropout_rate: on
        the attention weights. eps: LayerNorm epsilon. qk_norm: LayerNorm
        on queries and keys.
    """

    def __init__(self, dim: int, num_heads: int, mlp_layer: Callable[[], nn.Module], *,
                 drop_path_rate: float = 0.0, dropout_rate: float = 0.0,
                 attention_dropout_rate: float = 0.0, eps: float = 1e-6, qk_norm: bool = False) -> None:
        super().__init__()
        self.drop_path: nn.Module = nn.Identity()
        if drop_path_rate > 0:  # imported here: torchvision.ops costs ~1.4 s of start-up (it imports dynamo)
            from torchvision.ops import StochasticDepth
            self.drop_path = StochasticDepth(drop_path_rate, "row")
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, attention_dropout_rate, qk_norm)
        self.drop = nn.Dropout(dropout_rate)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = mlp_layer()
        self.is_moe = bool(getattr(self.mlp, "returns_metrics", False))
        self._last: Transient[Optional[Metrics]] = Transient(_nothing)  # not copied nor pickled

    @property
    def metrics(self) -> Optional[Metrics]:
        """The MLP's metrics of the last forward (None before one, and in a copy)."""
        return self._last.value

    @metrics.setter
    def metrics(self, value: Optional[Metrics]) -> None:
        self._last.value = value

    def forward(self, x: Tensor, noise: Optional[Tensor] = None) -> Tensor:
        """(B, N, D) -> (B, N, D); `noise` goes to an MLP that returns metrics."""
        x = x + self.drop_path(self.drop(self.attn(self.norm1(x))))
        if self.is_moe:
            y, self.metrics = self.mlp(self.norm2(x), noise=noise)
            return x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))
