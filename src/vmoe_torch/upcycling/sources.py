"""Reading a dense ViT from wherever a user has one: a weight file or model
directory (timm, torchvision, Hugging Face, vit_jax .npz, vmoe native, ours),
a state_dict, or a live timm / torchvision / Hugging Face module.

`read_dense` returns a `DenseSource` whose input normalisation is resolved
(`normalization`) and folded into the patch embedding, so the dense twin
takes images in [-1, 1] like every model of this library.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

from torch import nn

from ..models.vit_moe import VisionTransformerMoe
from . import normalization as norms
from .files import SourceError, WeightFile, load_json, load_npz, read_weight_file
from .readers import DenseSource, fold_input_normalization, read_hf, read_timm, read_torchvision, read_vit_jax

FORMATS = ("timm", "torchvision", "hf", "vit_jax", "native", "vmoe_torch")
Source = Union[str, nn.Module, Mapping[str, Any], DenseSource]
OURS = norms.Normalization(norms.HALF, norms.HALF, "this library: inputs in [-1, 1]")


def detect_format(keys: Sequence[str]) -> str:
    """The library a state_dict's key layout comes from."""
    from .readers import reject_non_vit
    keys = list(keys)
    if any(".mlp.experts." in k or ".mlp.router." in k or "/Moe/" in k for k in keys):
        raise SourceError("The source is already a V-MoE (it has experts and routers); upcycling "
                          "needs a dense ViT.")
    reject_non_vit(dict.fromkeys(keys), "the source")
    if any(k.startswith("patch_embed.proj") for k in keys) and any(k.startswith("blocks.") for k in keys):
        return "timm"
    if "conv_proj.weight" in keys:
        return "torchvision"
    if any("embeddings.patch_embeddings" in k for k in keys):
        return "hf"
    if "embedding/kernel" in keys or any(k.startswith(("Transformer/", "params/Transformer/")) for k in keys):
        return "vit_jax"
    raise SourceError("Unknown key layout: not a timm, torchvision, Hugging Face or vit_jax ViT "
                      f"(first keys: {sorted(keys)[:5]}). Pass source_format / --from.")


def _from_module(module: nn.Module, fmt: Optional[str], given: Optional[norms.Normalization],
                 **kw: Any) -> DenseSource:
    state = module.state_dict()
    fmt = fmt or detect_format(list(state))
    kind = type(module).__name__
    if fmt == "timm":
        heads = module.blocks[0].attn.num_heads  # type: ignore[index,union-attr]
        src = read_timm(state, num_heads=kw.get("num_heads") or heads, image_size=kw.get("image_size"),
                        where=f"timm {kind} module")
        recorded = norms.from_timm_cfg(getattr(module, "pretrained_cfg", None), "the timm model's pretrained_cfg")
        hint = " (this timm model has no pretrained_cfg: it was not built by timm.create_model)"
    elif fmt == "torchvision":
        heads = module.encoder.layers[0].self_attention.num_heads  # type: ignore[index,union-attr]
        src = read_torchvision(state, num_heads=kw.get("num_heads") or heads,
                               image_size=kw.get("image_size"), where=f"torchvision {kind} module")
        recorded, hint = None, ""
    elif fmt == "hf":
        src = read_hf(state, module.config.to_dict(), where=f"Hugging Face {kind} module")  # type: ignore[union-attr,operator]
        recorded = None
        hint = (" (a Hugging Face model does not carry its image processor's statistics: pass "
                "mean=processor.image_mean, std=processor.image_std)")
    else:
        raise SourceError(f"Cannot read a {fmt!r} source from an nn.Module; pass a file.")
    return _resolved(src, given, recorded, hint)


def _resolved(src: DenseSource, given: Optional[norms.Normalization], recorded: Optional[norms.Normalization],
              hint: str = "") -> DenseSource:
    norm = norms.resolve(given, recorded, src.normalization, where=src.description, hint=hint)
    return fold_input_normalization(DenseSource(src.config, src.state, norm, src.description, src.notes))


def read_dense(source: Source, source_format: Optional[str] = None, *, num_heads: Optional[int] = None,
               image_size: Optional[int] = None, classifier: Optional[str] = None,
               mean: norms.Values = None, std: norms.Values = None, normalization: Optional[str] = None,
               reference_config: Optional[Mapping[str, Any]] = None) -> DenseSource:
    """Reads a dense ViT from a file / directory / checkpoint prefix, a
    state_dict, or a live timm / torchvision / Hugging Face module, with its
    input normalisation (given as `mean`/`std` or a preset name
    `normalization`, else as recorded by the source, see `normalization`)
    folded in."""
    if source_format is not None and source_format not in FORMATS:
        raise SourceError(f"Unknown source format {source_format!r}; valid: {list(FORMATS)}.")
    given = norms.given(mean, std, normalization)
    kw: dict[str, Any] = dict(num_heads=num_heads, image_size=image_size)
    if isinstance(source, DenseSource):
        return source
    if isinstance(source, nn.Module):
        return _from_module(source, source_format, given, **kw)
    if isinstance(source, Mapping):
        fmt = source_format or detect_format(list(source))
        src = _from_state(dict(source), fmt, classifier, f"{fmt} state_dict", **kw)
        return _resolved(src, given, None, " (a bare state_dict records nothing)")
    path = str(source)
    if source_format == "native" or (source_format is None and os.path.exists(path + ".index")):
        return _from_native(path, reference_config)
    if source_format == "vmoe_torch" or _is_ours(path):
        model = VisionTransformerMoe.from_pretrained(path)
        if model.config.moe is not None:
            raise SourceError(f"{path!r} is already a V-MoE; upcycling needs a dense model.")
        return DenseSource(model.config, model.state_dict(), OURS, f"vmoe-torch {path}")
    if path.endswith(".npz"):
        src = read_vit_jax(load_npz(path), classifier, image_size, where=f"vit_jax {path}")
        return _resolved(src, given, None)
    loaded = read_weight_file(path)
    fmt = source_format or detect_format(list(loaded.state))
    folder_cfg = _folder_json(loaded.file, "config.json") if fmt in ("timm", "hf") else None
    if fmt == "timm" and kw["num_heads"] is None and folder_cfg and isinstance(folder_cfg.get("model_args"), dict):
        kw["num_heads"] = folder_cfg["model_args"].get("num_heads")  # recorded by save_for_hf(model_args=)
    src = _from_state(loaded.state, fmt, classifier, f"{fmt} {loaded.file}", **kw,
                      hf_config=folder_cfg if fmt == "hf" else None)
    recorded, hint = _recorded(loaded, fmt, folder_cfg)
    return _resolved(src, given, recorded, hint)


def _is_ours(path: str) -> bool:
    meta = load_json(os.path.join(path, "config.json")) if os.path.isdir(path) else None
    return bool(meta) and meta.get("format") == "vmoe-torch"  # type: ignore[union-attr]


def _folder_json(file: str, name: str) -> Optional[dict[str, Any]]:
    return load_json(os.path.join(os.path.dirname(file), name))


def _recorded(loaded: WeightFile, fmt: str, cfg: Optional[dict[str, Any]]
              ) -> tuple[Optional[norms.Normalization], str]:
    """The normalisation a weight file's folder (`cfg`: its config.json) or
    checkpoint records."""
    name = os.path.basename(loaded.file)
    if fmt == "hf":
        pre = _folder_json(loaded.file, "preprocessor_config.json")
        return (norms.from_hf_preprocessor(pre, "preprocessor_config.json"),
                f" (no preprocessor_config.json beside {name})")
    if fmt != "timm":
        return None, ""
    if cfg and ("pretrained_cfg" in cfg or "architecture" in cfg):  # timm save_for_hf / the Hub
        return norms.from_timm_cfg(cfg, "config.json pretrained_cfg"), ""
    args, arch = loaded.meta.get("args") or {}, loaded.meta.get("arch")
    if args.get("mean") is not None and args.get("std") is not None:
        return norms.Normalization(tuple(args["mean"]), tuple(args["std"]), f"{name}: train.py --mean/--std"), ""
    if arch:
        return _timm_default(arch, name), ""
    return None, f" (no timm config.json beside {name})"


def _timm_default(arch: str, name: str) -> Optional[norms.Normalization]:
    """timm train.py normalises with the architecture's pretrained_cfg unless
    given --mean/--std."""
    try:
        import timm
    except ImportError:
        return None
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is None or cfg.mean is None:
        return None
    return norms.Normalization(tuple(cfg.mean), tuple(cfg.std),
                               f"{name}: the data config timm's train.py used for {arch}")


def _from_state(state: dict[str, Any], fmt: str, classifier: Optional[str], where: str,
                hf_config: Optional[Mapping[str, Any]] = None, **kw: Any) -> DenseSource:
    if fmt == "timm":
        return read_timm(state, kw.get("num_heads"), kw.get("image_size"), where=where)
    if fmt == "torchvision":
        return read_torchvision(state, kw.get("num_heads"), kw.get("image_size"), where=where)
    if fmt == "hf":
        cfg = dict(hf_config or {})
        if kw.get("num_heads"):
            cfg["num_attention_heads"] = kw["num_heads"]
        return read_hf(state, cfg, where=where)
    if fmt == "vit_jax":
        import numpy as np
        return read_vit_jax({k: np.asarray(v) for k, v in state.items()}, classifier, kw.get("image_size"),
                            where=where)
    raise SourceError(f"Source format {fmt!r} needs a file path.")


def _from_native(prefix: str, reference_config: Optional[Mapping[str, Any]]) -> DenseSource:
    from ..convert.reference import load_reference_config, model_from_reference
    if reference_config is None:
        path = os.path.join(os.path.dirname(prefix), "config.json")
        if not os.path.exists(path):
            raise SourceError(f"A native checkpoint {prefix!r} needs its reference config "
                              "(config.json beside it, or --config).")
        reference_config = load_reference_config(path)
    model = model_from_reference(prefix, reference_config)
    if model.config.moe is not None:
        raise SourceError(f"{prefix!r} is already a V-MoE; upcycling needs a dense model.")
    return DenseSource(model.config, model.state_dict(), OURS, f"vmoe native {prefix}")


def dense_model(source: Source, source_format: Optional[str] = None, **kw: Any) -> VisionTransformerMoe:
    """Our dense twin of a dense ViT source, in eval mode (inputs in [-1, 1])."""
    src = read_dense(source, source_format, **kw)
    model = VisionTransformerMoe(src.config)
    load_into(model, src.state)
    return model.eval()


def load_into(model: nn.Module, state: Mapping[str, Any]) -> None:
    """`load_state_strict`, its ValueError as a SourceError."""
    from ..storage.pretrained import load_state_strict
    try:
        load_state_strict(model, state)
    except ValueError as e:
        raise SourceError(str(e)) from e
