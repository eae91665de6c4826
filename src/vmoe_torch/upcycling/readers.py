"""Dense ViT weights from timm, torchvision, Hugging Face and vit_jax /
big_vision into our dense twin (`VisionTransformerMoe` with `moe=None`).

Every reader maps names and layouts explicitly, checks that every source
tensor was used (a partial load is never silent) and returns a `DenseSource`:
our `ModelConfig`, the state_dict in our names, and, where the format fixes
it, the input normalisation the source model expects (`normalization`
resolves the rest). `fold_input_normalization` then folds it into the patch
embedding, so the dense twin takes images in [-1, 1] like every
model of this library and computes what the source computes on its own
normalised inputs.

Differences handled (and where):
- fused (timm, torchvision) vs split (HF, vit_jax) q/k/v;
- LayerNorm eps 1e-6 (timm, torchvision, vit_jax) vs the HF config's
  `layer_norm_eps` (1e-12 by default);
- exact GELU (timm, torchvision, HF "gelu") vs tanh GELU (vit_jax, HF
  "gelu_new" / "gelu_pytorch_tanh");
- timm's `fc_norm` (norm after average pooling) -> `norm_after_pool`;
- pooler / representation layers (HF `pooler`, torchvision `heads.pre_logits`,
  timm `pre_logits.fc`, vit_jax `pre_logits`) -> our Dense+tanh `pre_logits`;
- Hugging Face's two key layouts: `save_pretrained` files
  (`vit.encoder.layer.N.attention.attention.query`) and transformers 5.x
  modules in memory (`vit.layers.N.attention.q_proj`);
- input mean/std: fixed by the format for torchvision (ImageNet) and vit_jax
  ([-1, 1]); for timm and Hugging Face it is where the source records it
  (see `normalization`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ..config.model import ModelConfig
from .files import SourceError, State
from .normalization import HALF, IMAGENET_MEAN, IMAGENET_STD, Normalization

# Heads of the standard ViT widths, used when a fused-qkv source does not say.
STANDARD_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


@dataclass
class DenseSource:
    config: ModelConfig
    state: State
    normalization: Optional[Normalization] = None  # None: not known yet
    description: str = ""
    notes: list[str] = field(default_factory=list)


class _Taker:
    """Takes tensors out of a source state_dict by name; `leftover()` lists
    what was never taken."""

    def __init__(self, state: Mapping[str, Any], where: str) -> None:
        self.state = {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v
                      for k, v in state.items()}
        self.used: set[str] = set()
        self.where = where

    def has(self, key: str) -> bool:
        return key in self.state

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.state:
            raise SourceError(f"{self.where}: missing tensor {key!r}; this is not the expected "
                              "key layout (pick the right --from, or check the file).")
        self.used.add(key)
        return self.state[key].detach().float().clone()

    def check_all_used(self, ignore: Sequence[str] = ()) -> None:
        left = sorted(k for k in self.state if k not in self.used
                      and not any(re.fullmatch(p, k) for p in ignore))
        if left:
            raise SourceError(f"{self.where}: tensors with no mapping (would be silently dropped): "
                              f"{left[:12]}{' ...' if len(left) > 12 else ''}.")


def _heads(dim: int, num_heads: Optional[int], where: str) -> int:
    if num_heads:
        return num_heads
    if dim in STANDARD_HEADS:
        return STANDARD_HEADS[dim]
    raise SourceError(f"{where}: the fused q/k/v weight does not tell the number of attention "
                      f"heads for width {dim}; pass num_heads (--num-heads).")


def _grid_image_size(tokens: int, patch: tuple[int, int], image_size: Any, where: str
                     ) -> tuple[int, int]:
    """(H, W) the position embedding is for: given (an int or a pair), or a square grid."""
    if image_size:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        grid = (size[0] // patch[0]) * (size[1] // patch[1])
        if grid != tokens:
            raise SourceError(f"{where}: image_size {size} gives {grid} patches, the position "
                              f"embedding has {tokens}.")
        return (int(size[0]), int(size[1]))
    side = int(round(math.sqrt(tokens)))
    if side * side != tokens:
        raise SourceError(f"{where}: {tokens} position embeddings are not a square grid; pass image_size.")
    return (side * patch[0], side * patch[1])


def _count_blocks(keys: Sequence[str], pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
    if not ids:
        raise SourceError(f"No transformer blocks found (pattern {pattern!r}): not this key layout.")
    if ids != set(range(len(ids))):
        raise SourceError(f"Blocks {sorted(ids)} are not numbered 0..{len(ids) - 1}: a truncated file?")
    return len(ids)


def _reject(state: Mapping[str, Any], patterns: Mapping[str, str], where: str) -> None:
    for pattern, feature in patterns.items():
        if any(re.search(pattern, k) for k in state):
            raise SourceError(f"{where}: {feature} is not supported by this library's ViT; "
                              "nothing was loaded.")


def _block(out: State, i: int, get: Callable[[str], torch.Tensor], names: Mapping[str, str]) -> None:
    """Copies one block given our-suffix -> source-name (with q/k/v lists)."""
    for ours, theirs in names.items():
        out[f"blocks.{i}.{ours}"] = get(theirs)


# ------------------------------------------------------------------ timm
_NOT_A_VIT = {r"relative_position_bias_table|^layers\.\d+\.blocks\.": "a Swin Transformer",
              r"^stages\.\d+\.|^stem\.": "a hierarchical / convolutional model (stages, stem)",
              r"\.conv_dw\.|^levels\.": "a hybrid or convolutional model"}


def reject_non_vit(state: Mapping[str, Any], where: str) -> None:
    """A clear refusal for models that are not plain ViTs (Swin, ConvNeXt...),
    whose keys would otherwise only be "an unknown layout"."""
    for pattern, what in _NOT_A_VIT.items():
        if any(re.search(pattern, k) for k in state):
            raise SourceError(f"{where}: this is {what}, not a plain Vision Transformer; upcycling "
                              "reads ViTs (timm VisionTransformer / DeiT, torchvision vit_*, Hugging "
                              "Face ViTModel, vit_jax) only. Nothing was loaded.")


def read_timm(state: Mapping[str, Any], num_heads: Optional[int] = None, image_size: Optional[int] = None,
              where: str = "timm") -> DenseSource:
    """timm `VisionTransformer` / DeiT state_dict (global_pool 'token', or
    'avg' without a class token); the normalisation is left to the caller."""
    reject_non_vit(state, where)
    if "dist_token" in state or any(k.startswith("head_dist.") for k in state):
        raise SourceError(f"{where}: a distilled DeiT (dist_token, head_dist) has a second prefix token "
                          "and head that this library's ViT does not have. Use the non-distilled DeiT "
                          "(deit_*_patch16_224), or remove 'dist_token' and 'head_dist.*' from the "
                          "state_dict yourself (its class-token head then stands alone: its accuracy "
                          "changes).")
    _reject(state, {r"^reg_token": "register tokens (reg_tokens > 0)",
                    r"\.ls[12]\.gamma$": "layer scale (init_values)",
                    r"attn\.[qk]_norm\.": "timm's qk-norm (LayerNorm with bias)",
                    r"^norm_pre\.": "a pre-norm (norm_pre, CLIP-style)",
                    r"^attn_pool\.": "attention pooling (global_pool='map')",
                    r"^patch_embed\.(backbone|norm)": "a hybrid or normalised patch embedding"}, where)
    t = _Taker(state, where)
    cls = t.has("cls_token")
    fc_norm = t.has("fc_norm.weight")
    if cls and fc_norm:
        raise SourceError(f"{where}: average pooling over the non-class tokens (class token + "
                          "fc_norm) is not supported; use a global_pool='token' model, or one "
                          "without a class token.")
    out: State = {}
    w = t("patch_embed.proj.weight")
    dim, patch = w.shape[0], (int(w.shape[2]), int(w.shape[3]))
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = w, t("patch_embed.proj.bias")
    if cls:
        out["cls_token"] = t("cls_token")
    pos = t("pos_embed")
    out["pos_embed"] = pos
    layers = _count_blocks(list(t.state), r"blocks\.(\d+)\.")
    for i in range(layers):
        b = f"blocks.{i}"
        _block(out, i, t, {"norm1.weight": f"{b}.norm1.weight", "norm1.bias": f"{b}.norm1.bias",
                           "attn.qkv.weight": f"{b}.attn.qkv.weight",
                           "attn.proj.weight": f"{b}.attn.proj.weight", "attn.proj.bias": f"{b}.attn.proj.bias",
                           "norm2.weight": f"{b}.norm2.weight", "norm2.bias": f"{b}.norm2.bias",
                           "mlp.fc1.weight": f"{b}.mlp.fc1.weight", "mlp.fc1.bias": f"{b}.mlp.fc1.bias",
                           "mlp.fc2.weight": f"{b}.mlp.fc2.weight", "mlp.fc2.bias": f"{b}.mlp.fc2.bias"})
        qkv_b = f"{b}.attn.qkv.bias"
        out[f"{b}.attn.qkv.bias"] = t(qkv_b) if t.has(qkv_b) else torch.zeros(3 * dim)
    norm = "fc_norm" if fc_norm else "norm"
    out["norm.weight"], out["norm.bias"] = t(f"{norm}.weight"), t(f"{norm}.bias")
    rep = None
    if t.has("pre_logits.fc.weight"):
        out["pre_logits.weight"], out["pre_logits.bias"] = t("pre_logits.fc.weight"), t("pre_logits.fc.bias")
        rep = out["pre_logits.weight"].shape[0]
    classes = 0
    if t.has("head.weight"):
        out["head.weight"], out["head.bias"] = t("head.weight"), t("head.bias")
        classes = out["head.weight"].shape[0]
    t.check_all_used()
    prefix = 1 if cls else 0
    cfg = ModelConfig(
        num_classes=classes, patch_size=patch, hidden_size=dim, num_layers=layers,
        num_heads=_heads(dim, num_heads, where), mlp_dim=out["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=_grid_image_size(pos.shape[1] - prefix, patch, image_size, where),
        classifier="token" if cls else "gap", representation_size=rep, head_kernel_zero_init=False,
        gelu="erf", norm_after_pool=fc_norm, in_chans=int(w.shape[1]))
    return DenseSource(cfg, out, None, where)


# ----------------------------------------------------------- torchvision
TORCHVISION = Normalization(IMAGENET_MEAN, IMAGENET_STD, "torchvision's ViT weights: ImageNet statistics")


def read_torchvision(state: Mapping[str, Any], num_heads: Optional[int] = None,
                     image_size: Optional[int] = None, where: str = "torchvision") -> DenseSource:
    """torchvision `VisionTransformer` (vit_b_16, ...) state_dict; every
    torchvision ViT weight set uses the ImageNet statistics."""
    reject_non_vit(state, where)
    t = _Taker(state, where)
    out: State = {}
    w = t("conv_proj.weight")
    dim, patch = w.shape[0], (int(w.shape[2]), int(w.shape[3]))
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = w, t("conv_proj.bias")
    out["cls_token"] = t("class_token")
    pos = t("encoder.pos_embedding")
    out["pos_embed"] = pos
    layers = _count_blocks(list(t.state), r"encoder\.layers\.encoder_layer_(\d+)\.")
    for i in range(layers):
        b = f"encoder.layers.encoder_layer_{i}"
        fc1, fc2 = ("mlp.0", "mlp.3") if t.has(f"{b}.mlp.0.weight") else ("mlp.linear_1", "mlp.linear_2")
        _block(out, i, t, {"norm1.weight": f"{b}.ln_1.weight", "norm1.bias": f"{b}.ln_1.bias",
                           "attn.qkv.weight": f"{b}.self_attention.in_proj_weight",
                           "attn.qkv.bias": f"{b}.self_attention.in_proj_bias",
                           "attn.proj.weight": f"{b}.self_attention.out_proj.weight",
                           "attn.proj.bias": f"{b}.self_attention.out_proj.bias",
                           "norm2.weight": f"{b}.ln_2.weight", "norm2.bias": f"{b}.ln_2.bias",
                           "mlp.fc1.weight": f"{b}.{fc1}.weight", "mlp.fc1.bias": f"{b}.{fc1}.bias",
                           "mlp.fc2.weight": f"{b}.{fc2}.weight", "mlp.fc2.bias": f"{b}.{fc2}.bias"})
    out["norm.weight"], out["norm.bias"] = t("encoder.ln.weight"), t("encoder.ln.bias")
    rep = None
    if t.has("heads.pre_logits.weight"):
        out["pre_logits.weight"] = t("heads.pre_logits.weight")
        out["pre_logits.bias"] = t("heads.pre_logits.bias")
        rep = out["pre_logits.weight"].shape[0]
    out["head.weight"], out["head.bias"] = t("heads.head.weight"), t("heads.head.bias")
    t.check_all_used()
    cfg = ModelConfig(
        num_classes=out["head.weight"].shape[0], patch_size=patch, hidden_size=dim, num_layers=layers,
        num_heads=_heads(dim, num_heads, where), mlp_dim=out["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=_grid_image_size(pos.shape[1] - 1, patch, image_size, where), classifier="token",
        representation_size=rep, head_kernel_zero_init=False, gelu="erf", in_chans=int(w.shape[1]))
    return DenseSource(cfg, out, TORCHVISION, where)


# ------------------------------------------------------- Hugging Face ViT
_HF_GELU = {"gelu": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


# Our block suffix -> the block's source name, per Hugging Face key layout.
_HF_LAYOUTS = {
    "encoder.layer": {"q": "attention.attention.query", "k": "attention.attention.key",
                      "v": "attention.attention.value", "attn.proj": "attention.output.dense",
                      "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"},
    "layers": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj",
               "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
}


def _hf_layout(state: Mapping[str, Any], p: str, where: str) -> str:
    for layout in _HF_LAYOUTS:
        if any(k.startswith(f"{p}{layout}.") for k in state):
            return layout
    raise SourceError(f"{where}: no transformer blocks found under {p!r} (neither "
                      f"'{p}encoder.layer.N' as save_pretrained writes nor '{p}layers.N' as "
                      "transformers 5.x modules name them).")


def read_hf(state: Mapping[str, Any], config: Optional[Mapping[str, Any]] = None,
            where: str = "huggingface") -> DenseSource:
    """Hugging Face `ViTModel` / `ViTForImageClassification` state_dict (either
    key layout) with its config (a dict); the normalisation is left to the
    caller (preprocessor_config.json, or given)."""
    config = dict(config or {})
    kind = config.get("model_type", "vit")
    if kind == "deit":
        raise SourceError(f"{where}: a Hugging Face DeiT model (model_type 'deit') has a distillation "
                          "token and head that this library's ViT does not have. The non-distilled DeiTs "
                          "are ViTs on the Hub (model_type 'vit', e.g. facebook/deit-small-patch16-224): "
                          "use one of those.")
    if kind != "vit":
        raise SourceError(f"{where}: model_type {kind!r} is not a plain Vision Transformer ('vit'); "
                          "upcycling reads ViTs only.")
    act = config.get("hidden_act", "gelu")
    if act not in _HF_GELU:
        raise SourceError(f"{where}: hidden_act {act!r} is not supported; supported: {sorted(_HF_GELU)}.")
    p = "vit." if any(k.startswith("vit.") for k in state) else ""
    _reject(state, {r"embeddings\.mask_token": "a mask token (masked image modelling)",
                    r"distillation_token|^distillation_classifier": "a distilled DeiT (distillation token)"},
            where)
    layout = _HF_LAYOUTS[_hf_layout(state, p, where)]
    t = _Taker(state, where)
    out: State = {}
    e = f"{p}embeddings"
    w = t(f"{e}.patch_embeddings.projection.weight")
    dim, patch = w.shape[0], (int(w.shape[2]), int(w.shape[3]))
    out["patch_embed.proj.weight"] = w
    out["patch_embed.proj.bias"] = t(f"{e}.patch_embeddings.projection.bias")
    out["cls_token"] = t(f"{e}.cls_token")
    pos = t(f"{e}.position_embeddings")
    out["pos_embed"] = pos
    prefix = f"{p}encoder.layer" if layout is _HF_LAYOUTS["encoder.layer"] else f"{p}layers"
    layers = _count_blocks(list(t.state), rf"{re.escape(prefix)}\.(\d+)\.")
    for i in range(layers):
        b = f"{prefix}.{i}"
        qkv = [f"{b}.{layout[n]}" for n in "qkv"]
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([t(f"{n}.weight") for n in qkv])
        out[f"blocks.{i}.attn.qkv.bias"] = (torch.cat([t(f"{n}.bias") for n in qkv]) if t.has(f"{qkv[0]}.bias")
                                            else torch.zeros(3 * dim))
        names = {"norm1": "layernorm_before", "norm2": "layernorm_after",
                 **{k: v for k, v in layout.items() if k not in "qkv"}}
        _block(out, i, t, {f"{ours}.{x}": f"{b}.{theirs}.{x}" for ours, theirs in names.items()
                           for x in ("weight", "bias")})
    out["norm.weight"], out["norm.bias"] = t(f"{p}layernorm.weight"), t(f"{p}layernorm.bias")
    rep = None
    if t.has(f"{p}pooler.dense.weight"):  # ViTModel's pooler: tanh(Dense(token 0))
        out["pre_logits.weight"] = t(f"{p}pooler.dense.weight")
        out["pre_logits.bias"] = t(f"{p}pooler.dense.bias")
        rep = out["pre_logits.weight"].shape[0]
    classes = 0
    if t.has("classifier.weight"):
        out["head.weight"], out["head.bias"] = t("classifier.weight"), t("classifier.bias")
        classes = out["head.weight"].shape[0]
    t.check_all_used()
    heads = int(config.get("num_attention_heads") or _heads(dim, None, where))
    cfg = ModelConfig(
        num_classes=classes, patch_size=patch, hidden_size=dim, num_layers=layers, num_heads=heads,
        mlp_dim=out["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=_grid_image_size(pos.shape[1] - 1, patch, config.get("image_size"), where),
        classifier="token", representation_size=rep, head_kernel_zero_init=False,
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)), gelu=_HF_GELU[act],  # type: ignore[arg-type]
        in_chans=int(w.shape[1]))
    return DenseSource(cfg, out, None, where)


# ------------------------------------------------------ vit_jax / big_vision
_CLASS_K = re.compile(r"^(LayerNorm|MultiHeadDotProductAttention|MlpBlock)_(\d+)$")


def vit_jax_to_native(params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vit_jax .npz names (released numbering LayerNorm_0 /
    MultiHeadDotProductAttention_1 / LayerNorm_2 / MlpBlock_3, or Linen's
    per-class numbering) -> vmoe's native names, which `convert.mapping`
    maps to ours. Within a block the first LayerNorm is the attention norm."""
    if any(k.startswith(("conv_root", "gn_root", "block")) for k in params):
        raise SourceError("Hybrid R50+ViT checkpoints (conv_root / gn_root / block* keys) are not supported.")
    params = {k[len("params/"):] if k.startswith("params/") else k: v for k, v in params.items()}
    by_block: dict[str, dict[str, list[int]]] = {}
    for k in params:
        m = re.match(r"^Transformer/(encoderblock_\d+)/([^/]+)/", k)
        if m and _CLASS_K.match(m.group(2)):
            cls, idx = _CLASS_K.match(m.group(2)).groups()  # type: ignore[union-attr]
            ids = by_block.setdefault(m.group(1), {}).setdefault(cls, [])
            if int(idx) not in ids:
                ids.append(int(idx))
    out: dict[str, np.ndarray] = {}
    for k, v in params.items():
        name = k
        m = re.match(r"^Transformer/(encoderblock_\d+)/([^/]+)/(.*)$", k)
        if m:
            block, module, rest = m.groups()
            cm = _CLASS_K.match(module)
            if not cm:
                raise SourceError(f"vit_jax: unexpected module {module!r} in {k!r}.")
            cls, idx = cm.group(1), int(cm.group(2))
            rank = sorted(by_block[block][cls]).index(idx)
            ours = {"LayerNorm": f"LayerNorm_{rank}", "MultiHeadDotProductAttention": "SelfAttention",
                    "MlpBlock": "Mlp"}[cls]
            name = f"Encoder/{block}/{ours}/{rest}"
        elif k.startswith("Transformer/"):
            name = "Encoder/" + k[len("Transformer/"):]
        out[name] = np.asarray(v)
    return out


def read_vit_jax(params: Mapping[str, np.ndarray], classifier: Optional[str] = None,
                 image_size: Optional[int] = None, where: str = "vit_jax") -> DenseSource:
    """A vit_jax / big_vision dense ViT .npz (the released ViT-B_16.npz format)."""
    from ..convert.mapping import reference_to_torch
    native = vit_jax_to_native(params)
    try:
        mapped = reference_to_torch(native)
    except ValueError as e:
        raise SourceError(f"{where}: {e}") from e
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in mapped.items()}
    cls = "cls_token" in state
    w = state["patch_embed.proj.weight"]
    dim, patch = w.shape[0], (int(w.shape[2]), int(w.shape[3]))
    layers = _count_blocks(list(state), r"blocks\.(\d+)\.")
    heads = native["Encoder/encoderblock_0/SelfAttention/query/kernel"].shape[1]
    classifier = classifier or ("token" if cls else "gap")
    if (classifier == "token") != cls:
        raise SourceError(f"{where}: classifier {classifier!r} does not match the file (class token "
                          f"{'present' if cls else 'absent'}).")
    pos = state["pos_embed"]
    cfg = ModelConfig(
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0, patch_size=patch,
        hidden_size=dim, num_layers=layers, num_heads=int(heads),
        mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
        image_size=_grid_image_size(pos.shape[1] - (1 if cls else 0), patch, image_size, where),
        classifier=classifier,  # type: ignore[arg-type]
        representation_size=state["pre_logits.weight"].shape[0] if "pre_logits.weight" in state else None,
        head_kernel_zero_init=False, in_chans=int(w.shape[1]))
    return DenseSource(cfg, state, Normalization(HALF, HALF, "vit_jax: inputs in [-1, 1]"), where)


# ------------------------------------------------------------ shared step
def fold_input_normalization(src: DenseSource) -> DenseSource:
    """Rewrites the patch embedding so that images in [-1, 1] give what the
    source computes on (x01 - mean) / std: with x01 = (x + 1) / 2,
    W' = W / (2 std_c) and b' = b + sum W[:, c] (0.5 - mean_c) / std_c."""
    norm = src.normalization
    if norm is None:
        raise SourceError(f"{src.description}: the input normalisation is not resolved "
                          "(normalization.resolve) before folding.")
    mean = torch.tensor(norm.mean, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=torch.float64).view(1, -1, 1, 1)
    ours = Normalization(HALF[:1] * mean.shape[1], HALF[:1] * mean.shape[1], "this library: inputs in [-1, 1]")
    w = src.state["patch_embed.proj.weight"].double()
    if w.shape[1] != mean.shape[1]:
        raise SourceError(f"{src.description}: {mean.shape[1]} mean/std values ({norm.origin}) for "
                          f"{w.shape[1]} input channels.")
    note = f"{norm.describe()}"
    if torch.equal(mean, torch.full_like(mean, 0.5)) and torch.equal(std, torch.full_like(std, 0.5)):
        return DenseSource(src.config, src.state, ours, src.description, src.notes + [note])
    b = src.state["patch_embed.proj.bias"].double()
    state = dict(src.state)
    state["patch_embed.proj.weight"] = (w / (2 * std)).float()
    state["patch_embed.proj.bias"] = (b + (w * (0.5 - mean) / std).sum(dim=(1, 2, 3))).float()
    return DenseSource(src.config, state, ours, src.description,
                       src.notes + [note + ", folded into the patch embedding (inputs in [-1, 1])"])
