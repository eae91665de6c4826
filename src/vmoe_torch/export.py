"""Exporting models with a dynamic batch: `torch.export` and ONNX.

An MoE layer routes fixed-size groups of tokens, and a group's capacity
follows its size. A batch that fills whole routing groups therefore gives the
same graph for any number of groups; a batch that leaves a smaller last group
gives that group its own capacity, which is a different graph. So the batch
dimension is exported as `k * groups`, k being the smallest number of images
that fills whole routing groups (`batch_multiple`); a dense model has k = 1.
An exported program refuses other batch sizes with torch's shape-guard error.

Two details make the export symbolic in the number of groups:
  * torch specialises sizes 0 and 1 when it checks contiguity; the export
    runs with `backed_size_oblivious` so that one group and many groups share
    the graph (tested with 1, 2 and 3 groups);
  * ONNX has no stable sort, which routing needs (ties go to the lower index,
    as in the reference). ONNX's `TopK` is specified with exactly that tie
    rule, so `aten.sort.stable` is translated to a full-length `TopK`
    (`onnx_translations`).

An exported program returns logits only; the routing metrics and the
auxiliary loss are a training-time channel (`model.metrics`).
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any, Optional

import torch
import torch.fx.experimental._config as fx_config
from torch import Tensor
from torch.export import Dim, ExportedProgram

from .models.vit_moe import VisionTransformerMoe


def batch_multiple(model: VisionTransformerMoe, image_size: Optional[tuple[int, int]] = None) -> int:
    """The smallest number of images k such that a batch of k images fills
    whole routing groups in every MoE layer (1 for a dense model).

    Raises:
      ValueError: when the model routes the whole batch as one group
        (`group_size=None`): its capacity depends on the batch size.
    """
    cfg = model.config
    if cfg.moe is None:
        return 1
    group = model.group_size  # as the layers run now
    if group is None:
        raise ValueError("This model routes the whole batch as one group (moe.group_size=None), so "
                         "its capacity depends on the batch size and the batch cannot be dynamic. "
                         "Set moe.group_size (e.g. create_model(..., group_size=...)), or export "
                         "with a static batch (torch.export.export without dynamic_shapes).")
    height, width = image_size or cfg.image_size
    grid = model.patch_embed.grid(height, width)
    tokens_per_image = (grid[0] * grid[1] + model.num_prefix_tokens) * model.ensemble_size
    return group // math.gcd(group, tokens_per_image)


def dynamic_batch_shapes(model: VisionTransformerMoe, images: Tensor, max_batch: int = 65536) -> tuple:
    """`dynamic_shapes` for `torch.export.export(model, (images,), ...)`:
    batch = k * groups with k = `batch_multiple`."""
    k = batch_multiple(model, (images.shape[-2], images.shape[-1]))
    groups = Dim("groups", min=1, max=max(max_batch // k, 2))
    return ({0: k * groups},)


def _example(model: VisionTransformerMoe, images: Tensor) -> Tensor:
    """Two groups' worth of images, so that nothing is specialised to one group."""
    if images.dim() != 4:
        raise ValueError(f"Pass an example batch (B, C, H, W), got shape {tuple(images.shape)}.")
    k = batch_multiple(model, (images.shape[-2], images.shape[-1]))
    reps = -(-2 * k // images.shape[0])
    return images.repeat(reps, 1, 1, 1)[:2 * k].contiguous()


@contextlib.contextmanager
def _symbolic_groups():
    """One graph for one group and for many; quiet about `model.metrics`
    (assigned by the traced forward, not part of the exported program)."""
    with fx_config.patch(backed_size_oblivious=True), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*were assigned during export.*")
        yield


def export_program(model: VisionTransformerMoe, images: Tensor, max_batch: int = 65536) -> ExportedProgram:
    """`torch.export` of `model` in its current mode and routing, with a
    dynamic batch (multiples of `batch_multiple`). `images` gives the image
    size and dtype; its batch size does not matter."""
    example = _example(model, images)
    with _symbolic_groups():
        return torch.export.export(model, (example,), dynamic_shapes=dynamic_batch_shapes(model, example, max_batch))


def onnx_translations() -> dict[Any, Any]:
    """Custom ONNX translations for `torch.onnx.export(...,
    custom_translation_table=...)`: the stable sort of routing as a
    full-length TopK (ties: lower index first, as ONNX specifies)."""
    from onnxscript import opset18

    op: Any = opset18  # onnxscript's typed signatures do not cover these calls

    def sort_stable(self: Any, stable: Any = None, dim: int = -1, descending: bool = False) -> Any:
        length = op.Reshape(op.Gather(op.Shape(self), dim), op.Constant(value_ints=[1]))
        values, indices = op.TopK(self, length, axis=dim, largest=1 if descending else 0, sorted=1)
        return values, indices

    return {torch.ops.aten.sort.stable: sort_stable}


def export_onnx(model: VisionTransformerMoe, path: str | os.PathLike, images: Tensor,
                max_batch: int = 65536) -> Any:
    """Writes `model` as ONNX (`torch.onnx.export(..., dynamo=True)`) with a
    dynamic batch (multiples of `batch_multiple`) and returns the
    ONNXProgram. Needs the `onnx` extra (onnx, onnxscript)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'vmoe-torch[onnx]'.") from err
    example = _example(model, images)
    with _symbolic_groups():
        program = torch.onnx.export(model, (example,), dynamo=True, verbose=False,
                                    dynamic_shapes=dynamic_batch_shapes(model, example, max_batch),
                                    custom_translation_table=onnx_translations(),
                                    input_names=["images"], output_names=["logits"])
    assert program is not None
    program.save(os.fspath(path))
    return program
