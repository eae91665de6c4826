"""Experiment configuration: typed sections, YAML files, dotted overrides."""
from .schema import (
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

__all__ = ["DataConfig", "EvalConfig", "ExperimentConfig", "FewshotConfig", "FinetuneConfig",
           "ModelSection", "OptimConfig", "ScheduleConfig", "TrainConfig", "apply_overrides",
           "load_config"]
