"""Data: synthetic generator, readers, shard writer, curriculum, collators, WebDataset loaders."""
