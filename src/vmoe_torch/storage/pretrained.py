"""Our own model format, the `from_pretrained` directory: `model.safetensors`
+ `config.json` (+ a model card `README.md`). This module knows configs and
state dicts, not the model class: `VisionTransformerMoe.save_pretrained` /
`from_pretrained` build on it.

config.json schema (version 1):
  {"format": "vmoe-torch", "format_version": 1, "model": <ModelConfig as JSON>,
   "source": optional free-form provenance}
Weights are safetensors (no pickle). Writes go to a temporary sibling
directory that is renamed into place, so OUT_DIR is never half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config.model import ModelConfig
from ..config.typed import from_dict, to_dict
from ..utils.io import atomic_directory, atomic_write_text, looks_like_pickle
from ..utils.state import refuse_nonfinite, state_mismatch
from .calibration import Calibration, write_calibration
from .model_card import model_card

FORMAT, FORMAT_VERSION = "vmoe-torch", 1
FINGERPRINT_KEY = "vmoe_architecture_sha256"
# Settings one may change in config.json without touching the weights
# (run-time and training-only choices).
_RUNTIME = {"check_finite", "drop_path_rate", "dynamic_img_size"}
_RUNTIME_MOE = {"routing", "layer_routing", "group_size"}


def architecture_fingerprint(cfg: ModelConfig) -> str:
    """SHA-256 of the config fields the weights were built for. Routing,
    group size and check_finite are run-time choices and are left out; the
    rest (heads, eps, GELU, pooling, ...) cannot be checked from tensor shapes
    alone, so model.safetensors records this and loading compares it."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in _RUNTIME}
    if data.get("moe"):
        data["moe"] = {k: v for k, v in data["moe"].items() if k not in _RUNTIME_MOE}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def check_state(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Raises ValueError listing every missing, unexpected or mis-shaped entry."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = state_mismatch(own, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise ValueError("Checkpoint does not match the model config:" + problems)


def load_state_strict(model: torch.nn.Module, state: Mapping[str, Any]) -> None:
    """Copies `state` into `model`, failing on any missing, unexpected or
    mis-shaped entry (no silent partial loads)."""
    check_state(model, state)
    own = model.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(torch.as_tensor(v))


def config_json(cfg: ModelConfig, source: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The content of config.json for a model of config `cfg`."""
    meta: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": to_dict(cfg)}
    if source:
        meta["source"] = source
    return meta


def write_metadata(out_dir: str, cfg: ModelConfig, source: Optional[dict[str, Any]] = None,
                   calibration: Optional[Calibration] = None) -> None:
    """config.json, the model card README.md and the calibration (when
    there is one), next to the weights."""
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config_json(cfg, source), f, indent=2)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(model_card(cfg, source, calibration))
    if calibration is not None:
        write_calibration(out_dir, calibration)


def add_calibration(path: str, calibration: Calibration) -> None:
    """Adds (or replaces) the calibration of model directory `path`, and the
    model card's table of it; each file is replaced atomically."""
    check_pretrained_dir(path)
    with open(os.path.join(path, "config.json")) as f:
        source = json.load(f).get("source")
    write_calibration(path, calibration)
    atomic_write_text(os.path.join(path, "README.md"), model_card(read_config(path), source, calibration))


def write_pretrained(state: Mapping[str, torch.Tensor], cfg: ModelConfig, out_dir: str,
                     overwrite: bool = False, source: Optional[dict[str, Any]] = None,
                     allow_nonfinite: bool = False, calibration: Optional[Calibration] = None) -> None:
    """Writes `state` (a model's state_dict) as model.safetensors + config.json
    + README.md atomically to `out_dir`. Weights with NaN or Inf values are
    refused (a diverged model) unless `allow_nonfinite`."""
    if not allow_nonfinite:
        refuse_nonfinite(state, out_dir)
    with atomic_directory(out_dir, overwrite) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, os.path.join(tmp, "model.safetensors"),
                  metadata={FINGERPRINT_KEY: architecture_fingerprint(cfg)})
        write_metadata(tmp, cfg, source, calibration)


def check_fingerprint(path: str, cfg: ModelConfig) -> None:
    """Refuses a config.json edited away from the architecture the weights of
    `path` were saved with (routing, group size and check_finite may change)."""
    weights = os.path.join(path, "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        recorded = (f.metadata() or {}).get(FINGERPRINT_KEY)
    if recorded is not None and recorded != architecture_fingerprint(cfg):  # older files have none
        raise ValueError(f"config.json next to {weights!r} does not describe the architecture these "
                         "weights were saved with (an edited num_heads, eps, GELU, pooling...?). "
                         "Restore the original config.json; only routing settings, group_size and "
                         "check_finite may be changed.")


def read_config(path: str) -> ModelConfig:
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file!r} is not valid JSON ({e}).") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{file!r} not found: {path!r} is not a from_pretrained directory.") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path!r}/config.json is not a {FORMAT} config (format={meta.get('format')!r}).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"Unsupported format_version {meta.get('format_version')!r}.")
    return from_dict(ModelConfig, meta["model"])


def read_weights(path: str, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of `path`/model.safetensors; an unreadable file is refused,
    naming it."""
    weights = os.path.join(path, "model.safetensors")
    try:
        state = load_file(weights, device=map_location)
    except Exception as e:  # noqa: BLE001 - name the file, whatever safetensors says
        kind = ("it is not a safetensors file (a pickle?)" if looks_like_pickle(weights)
                else "it is truncated or corrupt")
        raise ValueError(f"Cannot read {weights!r}: {kind} ({type(e).__name__}: {e}).") from e
    return state


def check_pretrained_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} is not a directory with model.safetensors and config.json.")
