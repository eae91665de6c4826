"""Evaluators: classification accuracy, routing-grid sweeps, few-shot linear probes."""
from .classification import evaluate_classification, routing_grid
from .fewshot import extract_features, fewshot_evaluate

__all__ = ["evaluate_classification", "routing_grid", "extract_features", "fewshot_evaluate"]
