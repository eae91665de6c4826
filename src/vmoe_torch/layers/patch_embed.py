"""Conv patch embedding (kernel = stride = patch size, VALID padding)."""
from __future__ import annotations

from torch import Tensor, nn

from .init import lecun_normal_


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/ph * W/pw, D), patches row-major over (h, w)."""

    def __init__(self, patch_size: tuple[int, int], dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size: tuple[int, int] = (int(patch_size[0]), int(patch_size[1]))
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)
        lecun_normal_(self.proj.weight, in_chans * self.patch_size[0] * self.patch_size[1])
        assert self.proj.bias is not None
        nn.init.zeros_(self.proj.bias)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of the patch size "
                f"{ph}x{pw}. Resize or crop the images to a multiple of the patch size.")
        return height // ph, width // pw

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)
