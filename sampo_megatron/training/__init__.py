"""The training loop and its parts: steps, reference model, checkpoints, metrics."""
