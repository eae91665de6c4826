"""Dense ViTs from timm, torchvision, Hugging Face and vit_jax into this
library, and sparse upcycling of them into V-MoEs."""
from .core import FORMATS, dense_model, detect_format, read_dense, upcycle, upcycled_state
from .files import SourceError
from .readers import DenseSource

__all__ = ["FORMATS", "dense_model", "detect_format", "read_dense", "upcycle", "upcycled_state",
           "SourceError", "DenseSource"]
