"""Dense ViTs from timm, torchvision, Hugging Face and vit_jax into this
library, and sparse upcycling of them into V-MoEs."""
from .core import upcycle, upcycled_state
from .files import SourceError
from .normalization import PRESETS as NORMALIZATIONS
from .normalization import Normalization
from .readers import DenseSource
from .sources import FORMATS, dense_model, detect_format, read_dense

__all__ = ["FORMATS", "NORMALIZATIONS", "Normalization", "dense_model", "detect_format", "read_dense",
           "upcycle", "upcycled_state", "SourceError", "DenseSource"]
