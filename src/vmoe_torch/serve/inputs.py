"""Decoding and checking one request's JSON body before any model work.

    {"images": ["<base64 PNG/JPEG/...>", ...]      # encoded files, and/or
     "arrays": [[[[r, g, b], ...], ...], ...],     # H x W x C numbers in 0..255
     "budget": {"relative": 0.5}}                  # optional: one of relative / flops / accuracy_drop

Every image must have the model's size and channels (resize on the client:
the server does not guess a resampling). A bad request raises BadRequest
with an HTTP status and a message naming the image and the fix.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Optional

import numpy as np
import torch

from ..data.pipeline import to_model_range

BUDGET_KEYS = ("relative", "flops", "accuracy_drop")


class BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_budget(budget: Any) -> Optional[dict[str, float]]:
    if budget is None:
        return None
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in BUDGET_KEYS:
        raise BadRequest(400, f"budget {budget!r}: give one of {list(BUDGET_KEYS)}, e.g. {{\"relative\": 0.5}}.")
    key, value = next(iter(budget.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BadRequest(400, f"budget {key}={value!r} is not a finite number.")
    return {key: float(value)}


def _decode_file(data: Any, index: int, channels: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError
    if not isinstance(data, str):
        raise BadRequest(400, f"images[{index}] is not a base64 string.")
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as opened:
            arr = np.asarray(opened.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise BadRequest(400, f"images[{index}] cannot be decoded as an image file ({type(e).__name__}).") from e
    return arr if arr.ndim == 3 else arr[:, :, None]


def _array(data: Any, index: int) -> np.ndarray:
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BadRequest(400, f"arrays[{index}] is not a rectangular array of numbers.") from e
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise BadRequest(422, f"arrays[{index}] has {arr.ndim} dimensions; give H x W x C.")
    if not np.isfinite(arr).all():
        raise BadRequest(422, f"arrays[{index}] holds NaN or infinite values.")
    if arr.min() < 0 or arr.max() > 255:
        raise BadRequest(422, f"arrays[{index}] has values outside 0..255 (pixel values are expected).")
    return arr


def parse_images(body: Any, image_size: tuple[int, int], channels: int, max_images: int) -> torch.Tensor:
    """(n, C, H, W) float images in [-1, 1], checked."""
    if not isinstance(body, dict):
        raise BadRequest(400, "The body must be a JSON object with 'images' and/or 'arrays'.")
    unknown = sorted(set(body) - {"images", "arrays", "budget"})
    if unknown:
        raise BadRequest(400, f"Unknown field(s) {unknown}; the fields are 'images', 'arrays' and 'budget'.")
    files, arrays = body.get("images") or [], body.get("arrays") or []
    if not isinstance(files, list) or not isinstance(arrays, list):
        raise BadRequest(400, "'images' and 'arrays' must be lists.")
    count = len(files) + len(arrays)
    if count == 0:
        raise BadRequest(400, "No image: give 'images' (base64 files) or 'arrays' (H x W x C pixel values).")
    if count > max_images:
        raise BadRequest(413, f"{count} images in one request; this server takes at most {max_images}.")
    decoded = [_decode_file(f, i, channels) for i, f in enumerate(files)]
    decoded += [_array(a, i) for i, a in enumerate(arrays)]
    for i, arr in enumerate(decoded):
        if arr.shape[:2] != tuple(image_size) or arr.shape[2] != channels:
            raise BadRequest(422, f"image {i} is {arr.shape[0]}x{arr.shape[1]} with {arr.shape[2]} channel(s); "
                                  f"this model takes {image_size[0]}x{image_size[1]} with {channels} "
                                  "(resize on the client).")
    return to_model_range(torch.from_numpy(np.stack(decoded).astype(np.float32)).permute(0, 3, 1, 2))
