"""Our own files: `from_pretrained` directories (safetensors + config.json +
model card), training work dirs (layout, lock) and sharded checkpoint files.
Knows configs and state dicts, not the model class (which builds on it)."""
