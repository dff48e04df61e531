"""Training: the engine and its events, the standard handlers, data sources, checkpoints, distributed helpers."""
