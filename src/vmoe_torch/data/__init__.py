"""Datasets, the bundled cluttered-digits task, batching and augmentation."""
from .digits import ClutteredDigits, make_cluttered_digits
from .pipeline import ImageDataset, build_datasets, eval_batches, step_batches, to_model_range

__all__ = ["ClutteredDigits", "make_cluttered_digits", "ImageDataset", "build_datasets",
           "eval_batches", "step_batches", "to_model_range"]
