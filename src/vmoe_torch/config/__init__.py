"""Typed configuration, one home for every setting: routing (`routing.py`),
the model (`model.py`), the size table and paper descriptions
(`descriptions.py`), the catalogue of named models (`catalogue.py`), the
experiment file (`experiment.py`) and the loader that rejects unknown keys
and bad values (`typed.py`). Pure data: nothing here builds a module."""
from .catalogue import list_models, resolve_config
from .experiment import (
                         DataConfig,
                         EvalConfig,
                         ExperimentConfig,
                         FewshotConfig,
                         FinetuneConfig,
                         ModelSection,
                         OptimConfig,
                         ScheduleConfig,
                         TrainConfig,
                         apply_overrides,
                         load_config,
)
from .model import LayerRouting, ModelConfig, MoeConfig
from .routing import RoutingConfig

__all__ = ["DataConfig", "EvalConfig", "ExperimentConfig", "FewshotConfig", "FinetuneConfig",
           "ModelSection", "OptimConfig", "ScheduleConfig", "TrainConfig", "apply_overrides",
           "load_config", "list_models", "resolve_config", "LayerRouting", "ModelConfig", "MoeConfig",
           "RoutingConfig"]
