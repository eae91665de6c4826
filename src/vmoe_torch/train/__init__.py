"""Training: optimisers and schedules, losses, train-state checkpoints, the loop."""
