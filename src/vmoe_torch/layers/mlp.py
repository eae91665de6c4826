"""Dense-GELU-Dense block (vit_jax MlpBlock)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .init import xavier_uniform_


class Mlp(nn.Module):
    """(..., D) -> (..., D) with hidden size H; GELU is the tanh approximation
    (flax's) unless `gelu="erf"` (exact, as timm / torchvision / HF)."""

    def __init__(self, dim: int, mlp_dim: int, dropout_rate: float = 0.0, gelu: str = "tanh") -> None:
        super().__init__()
        self.approximate = "tanh" if gelu == "tanh" else "none"
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.dropout = nn.Dropout(dropout_rate)
        for fc in (self.fc1, self.fc2):
            xavier_uniform_(fc.weight, fc.in_features, fc.out_features)
            nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dropout(F.gelu(self.fc1(x), approximate=self.approximate))
        return self.dropout(self.fc2(x))
