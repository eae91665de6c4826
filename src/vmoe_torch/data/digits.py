"""The bundled default dataset: the 1,797 UCI handwritten digits shipped by
scikit-learn (`sklearn.datasets.load_digits`), composited into larger
canvases with clutter.

Each image is a canvas (default 32x32) with one randomly scaled and placed
digit plus distractor strokes (fragments of other digits of the same split)
and pixel noise, so a few patches carry the class and most do not: the
situation Batch Priority Routing is designed for. The train/test split is by
source digit (no digit is rendered in both), and everything is a pure
function of the seed.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ClutteredDigits:
    """uint8 images (N, 3, H, W), int64 labels (N,), and the source digit
    index of each render (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    source: torch.Tensor
    num_classes: int = 10

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI digits scikit-learn ships: (1797, 8, 8) in [0, 1], labels.
    Read from the package's data file, as `sklearn.datasets.load_digits`
    reads it, without importing scikit-learn (about a second of start-up
    for every training process); `load_digits` itself where the file is
    not found."""
    spec = importlib.util.find_spec("sklearn")
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if path is not None and os.path.exists(path):
        data = np.loadtxt(path, delimiter=",")
        images, target = data[:, :-1].reshape(-1, 8, 8), data[:, -1]
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        images, target = d.images, d.target
    return images.astype(np.float32) / 16.0, target.astype(np.int64)


def _resize(patches: torch.Tensor, size: int) -> torch.Tensor:
    """(n, h, w) -> (n, size, size), bilinear, clamped to [0, 1]."""
    return F.interpolate(patches[:, None], size=(size, size), mode="bilinear",
                         align_corners=False)[:, 0].clamp(0, 1)


def _render_split(digits: torch.Tensor, renders: int, size: int, clutter: int,
                  gen: torch.Generator) -> torch.Tensor:
    """Renders every digit `renders` times: (renders * n, size, size) in [0, 1].

    All random draws happen first (in a fixed order), resizing is batched by
    target size, and pasting is a max-composite into each canvas.
    """
    n = len(digits)
    total = renders * n
    src = torch.arange(n).repeat(renders)
    # Distractors: 3x3..5x5 crops of other digits of the split, shrunk to 4..9 px.
    other = torch.randint(0, n, (total, clutter), generator=gen)
    ch = torch.randint(3, 6, (total, clutter), generator=gen)
    cw = torch.randint(3, 6, (total, clutter), generator=gen)
    cy = (torch.rand(total, clutter, generator=gen) * (9 - ch)).long()
    cx = (torch.rand(total, clutter, generator=gen) * (9 - cw)).long()
    fs = torch.randint(4, 10, (total, clutter), generator=gen)
    fy = (torch.rand(total, clutter, generator=gen) * (size - fs + 1)).long()
    fx = (torch.rand(total, clutter, generator=gen) * (size - fs + 1)).long()
    fi = 0.3 + 0.3 * torch.rand(total, clutter, generator=gen)
    # The digit: 12..20 px whatever the canvas size, brighter than the clutter.
    lo, hi = 12, 20
    ds = torch.randint(lo, hi + 1, (total,), generator=gen)
    dy = (torch.rand(total, generator=gen) * (size - ds + 1)).long()
    dx = (torch.rand(total, generator=gen) * (size - ds + 1)).long()
    di = 0.8 + 0.2 * torch.rand(total, generator=gen)
    noise = 0.08 * torch.rand(total, size, size, generator=gen)

    canvas = np.zeros((total, size, size), np.float32)   # numpy: cheap slicing in the paste loops
    # Batched by (crop h, crop w, target size): one interpolate call per group.
    key = (ch * 8 + cw) * 16 + fs
    for k in key.unique().tolist():
        sel = (key == k).nonzero()
        t, c = sel[:, 0], sel[:, 1]
        h, w, s = k // 16 // 8, k // 16 % 8, k % 16
        rows = cy[t, c, None] + torch.arange(h)                      # (m, h)
        cols = cx[t, c, None] + torch.arange(w)                      # (m, w)
        crops = digits[other[t, c][:, None, None], rows[:, :, None], cols[:, None, :]]
        patches = (_resize(crops, s) * fi[t, c, None, None]).numpy()
        for j, (tj, y, x) in enumerate(zip(t.tolist(), fy[t, c].tolist(), fx[t, c].tolist())):
            region = canvas[tj, y:y + s, x:x + s]
            np.maximum(region, patches[j], out=region)
    for s in ds.unique().tolist():
        idx = (ds == s).nonzero()[:, 0]
        big = (_resize(digits[src[idx]], s) * di[idx, None, None]).numpy()
        for j, (t, y, x) in enumerate(zip(idx.tolist(), dy[idx].tolist(), dx[idx].tolist())):
            region = canvas[t, y:y + s, x:x + s]
            np.maximum(region, big[j], out=region)
    return (torch.from_numpy(canvas) + noise).clamp(0, 1)


@functools.lru_cache(maxsize=4)
def make_cluttered_digits(seed: int = 0, image_size: int = 32, train_renders: int = 6,
                          test_renders: int = 5, clutter: int = 3,
                          test_fraction: float = 0.3) -> tuple[ClutteredDigits, ClutteredDigits]:
    """Builds (train, test). Deterministic for a seed; split by source digit.
    Cached per process: callers must not modify the returned tensors."""
    if image_size < 20:
        raise ValueError(f"image_size must be >= 20 for cluttered digits, got {image_size}.")
    images, labels = _load_digits()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    n_test = int(round(len(labels) * test_fraction))
    splits = {"test": order[:n_test], "train": order[n_test:]}
    out = {}
    for name, idx in splits.items():
        renders = train_renders if name == "train" else test_renders
        digits = torch.from_numpy(images[idx.numpy()])
        split_gen = torch.Generator().manual_seed(seed * 7919 + (1 if name == "train" else 2))
        canvases = _render_split(digits, renders, image_size, clutter, split_gen)
        batch = (canvases * 255).round().to(torch.uint8)
        out[name] = ClutteredDigits(
            images=batch[:, None].expand(-1, 3, -1, -1).contiguous(),
            labels=torch.from_numpy(labels[idx.numpy()]).repeat(renders),
            source=idx.repeat(renders))
    return out["train"], out["test"]


def export_image_folder(out_dir: str, seed: int = 0, image_size: int = 32, overwrite: bool = False) -> dict[str, int]:
    """Writes the bundled digits as an ImageFolder tree of PNGs,
    `out_dir/{train,validation}/<class>/<index>.png`, the layout timm's and
    torchvision's datasets read. Atomic: the tree appears complete or not
    at all. Returns the number of images per split."""
    import os

    from PIL import Image

    from ..utils.io import atomic_directory
    counts = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for split, data in zip(("train", "validation"), make_cluttered_digits(seed, image_size)):
            for label in range(data.num_classes):
                os.makedirs(os.path.join(tmp, split, str(label)))
            pixels = data.images.permute(0, 2, 3, 1).numpy()
            for i, (image, label) in enumerate(zip(pixels, data.labels.tolist())):
                Image.fromarray(image).save(os.path.join(tmp, split, str(label), f"{i:05d}.png"))
            counts[split] = len(data)
    return counts
