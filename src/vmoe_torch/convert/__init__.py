"""Foreign formats: the reference's native checkpoints (JAX-free), its
configs, parameter-name mapping and released checkpoints. Our own format is
`vmoe_torch.storage`."""
from .native import CheckpointError, read_reference_checkpoint, write_reference_checkpoint
from .reference import load_reference_config, model_from_reference, model_to_reference
from .reference_config import config_from_reference, config_to_reference

__all__ = ["CheckpointError", "read_reference_checkpoint", "write_reference_checkpoint",
           "load_reference_config", "model_from_reference", "model_to_reference", "config_from_reference",
           "config_to_reference"]
