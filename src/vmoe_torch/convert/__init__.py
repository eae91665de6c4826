"""Checkpoint conversion: vmoe's native format (JAX-free) and safetensors."""
from .native import CheckpointError, read_reference_checkpoint, write_reference_checkpoint
from .pretrained import from_pretrained, save_pretrained
from .reference import load_reference_config, model_from_reference, model_to_reference
from .reference_config import config_from_reference, config_to_reference

__all__ = ["CheckpointError", "read_reference_checkpoint", "write_reference_checkpoint",
           "from_pretrained", "save_pretrained", "load_reference_config",
           "model_from_reference", "model_to_reference", "config_from_reference",
           "config_to_reference"]
