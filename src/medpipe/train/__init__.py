"""Training: the loop, checkpoints, and (later) distributed helpers."""
