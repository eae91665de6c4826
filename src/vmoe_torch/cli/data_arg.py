"""The one rule for a command's `--data` argument (a YAML experiment config,
or a data.name such as 'digits') against a loaded model."""
from __future__ import annotations

from typing import Any, Sequence


def test_split(data: str, overrides: Sequence[str], model: Any) -> tuple[Any, Any]:
    """(experiment config, test split) of `data` with `overrides`, rendered
    at the model's image size."""
    from ..config import load_config
    from ..data.pipeline import build_datasets
    if data.endswith((".yaml", ".yml")):
        cfg = load_config(data, list(overrides))
    else:
        cfg = load_config(None, [f"data.name={data}"] + list(overrides))
    if tuple(model.config.image_size) != (cfg.data.image_size,) * 2:
        cfg.data.image_size = model.config.image_size[0]
    return cfg, build_datasets(cfg.data)[1]
