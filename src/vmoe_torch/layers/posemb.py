"""Position embeddings: sincos2d, and resampling a learned grid ("vit_zoom")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos2d_pos_embed(h: int, w: int, dim: int, temperature: float = 10_000.0,
                       dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """(h*w, D) MoCo-v3 style embedding, row-major patches:
    concat(sin(x*omega), cos(x*omega), sin(y*omega), cos(y*omega)),
    omega_i = 1 / temperature**(i / (D/4 - 1))."""
    if dim % 4 or dim < 8:
        raise ValueError(f"sincos2d needs a hidden size that is a multiple of 4 and >= 8, got {dim}.")
    y, x = torch.meshgrid(torch.arange(h, dtype=dtype, device=device),
                          torch.arange(w, dtype=dtype, device=device), indexing="ij")
    y, x = y.flatten(), x.flatten()
    omega = torch.arange(dim // 4, dtype=dtype, device=device) / (dim // 4 - 1)
    omega = 1.0 / temperature**omega
    x, y = x[:, None] * omega, y[:, None] * omega
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def resample_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int],
                       new_grid: tuple[int, int], num_prefix_tokens: int) -> Tensor:
    """Zooms a learned (1, prefix + h*w, D) embedding to another (h', w') grid
    with linear interpolation whose corners map onto corners (scipy
    `ndimage.zoom(order=1)`, as the reference's vit_zoom). Prefix tokens (the
    class token) are kept as they are."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    (h, w), dim = old_grid, pos_embed.shape[-1]
    if grid.shape[1] != h * w:
        raise ValueError(f"Position embedding has {grid.shape[1]} grid tokens, not {h}x{w}.")
    grid = grid.reshape(1, h, w, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
