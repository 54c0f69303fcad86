"""Pieces of the training loop (``ctgen.training.loop``): checkpoints, EMA, optimiser, metrics, DDP setup."""
