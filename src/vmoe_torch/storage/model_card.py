"""A Hugging Face-style model card (README.md) for a saved model directory:
architecture, routing, where the weights come from, parity where known, and
the licence that applies."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..config.model import ModelConfig
from .calibration import Calibration, card_lines


def _routing_lines(cfg: ModelConfig) -> list[str]:
    if cfg.moe is None:
        return ["- Dense ViT (no MoE layers)."]
    moe, r = cfg.moe, cfg.moe.routing
    lines = [f"- MoE blocks {list(moe.layers)} of {cfg.num_layers}, E = {moe.num_experts} experts, "
             f"routing groups of {moe.group_size} tokens."]
    if r.router == "soft":
        lines.append(f"- Soft MoE router: {r.num_slots or 'round(S·C/E)'} slots per expert "
                     f"(capacity factor {r.capacity_factor}), nothing dropped, no auxiliary loss.")
    else:
        cap = f"capacity {r.capacity}" if r.capacity is not None else f"capacity factor {r.capacity_factor}"
        lines.append(f"- Router `{r.router}`, K = {r.num_selected_experts}, {cap}, "
                     f"Batch Priority Routing {'on' if r.batch_priority else 'off'}, bfloat16 dispatch "
                     f"{'on' if r.effective_bfloat16 else 'off'}.")
    if moe.ensemble_size > 1:
        lines.append(f"- E³ ensemble of {moe.ensemble_size} members: logits are (B·M, classes); average "
                     "them with `vmoe_torch.models.ensemble_log_probs`.")
    for entry in moe.layer_routing:
        lines.append(f"- Block {entry.layer} routes differently: {entry.routing}.")
    return lines


def _file(record: Any) -> str:
    """A recorded source: `name` (sha256 ...) for a file record, else as given."""
    if isinstance(record, Mapping) and "file" in record:
        return f"`{record['file']}` (sha256 `{record.get('sha256', '?')}`)"
    return f"`{record}`"


def model_card(cfg: ModelConfig, source: Optional[Mapping[str, Any]] = None,
               calibration: Optional[Calibration] = None) -> str:
    source = dict(source or {})
    kind = source.get("kind", "trained")
    lines = ["---", "library_name: vmoe-torch", "tags: [vision, image-classification, mixture-of-experts]",
             f"license: {source.get('license', 'other')}", "---", "",
             f"# {source.get('title') or ('V-MoE' if cfg.moe else 'ViT')} "
             f"({cfg.hidden_size}-d, {cfg.num_layers} blocks, patch {cfg.patch_size[0]})", "",
             "## Architecture", "",
             f"- Vision Transformer: hidden {cfg.hidden_size}, {cfg.num_layers} blocks, {cfg.num_heads} "
             f"heads, MLP {cfg.mlp_dim}, patch {cfg.patch_size}, {cfg.image_size[0]}×{cfg.image_size[1]} "
             f"px, `{cfg.classifier}` head, {cfg.num_classes} classes.",
             f"- LayerNorm eps {cfg.layer_norm_eps}, GELU `{cfg.gelu}`; inputs NCHW in [-1, 1]."]
    lines += _routing_lines(cfg)
    lines += card_lines(calibration)
    lines += ["", "## Source", ""]
    if kind == "upcycled":
        origin = _file({k: source[k] for k in ("file", "sha256") if k in source})
        lines += [f"Sparse-upcycled (arXiv 2212.05055) from a dense `{source.get('from')}` ViT: "
                  f"{origin}. Every expert starts as the dense MLP of its block "
                  f"(noise std {source.get('noise_std', 0.0)} × rms, seed {source.get('seed', 0)}); "
                  "the routers are new; all other weights are copied."]
        lines += [f"- {note}" for note in source.get("notes", [])]
    elif "reference_checkpoint" in source or "reference_prefix" in source:
        lines += [f"Converted from Google's vmoe checkpoint "
                  f"{_file(source.get('reference_checkpoint') or source.get('reference_prefix'))} "
                  "(google-research/vmoe, Apache-2.0) with vmoe-torch's JAX-free reader.",
                  "Parity: the converter is checked against reference models (logits within 1e-5 "
                  "relative; see docs/checkpoints.md)."]
    else:
        lines += ["Trained with vmoe-torch." if kind == "trained" else f"{kind}."]
    lines += ["", "## Licence", "",
              "The licence of the source weights applies." if kind != "trained"
              else "As chosen by the person who trained it.", "",
              "## Use", "", "```python", "import vmoe_torch",
              "model = vmoe_torch.from_pretrained('<this directory>')", "```", ""]
    return "\n".join(lines)
