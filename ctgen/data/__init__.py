"""Data on the model side: shard reading, batches for the training loop, text conditioning, model layout."""
