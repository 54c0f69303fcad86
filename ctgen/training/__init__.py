"""Pieces of the training loop (``ctgen.train``): checkpoints, EMA, optimiser, metrics, DDP setup."""
