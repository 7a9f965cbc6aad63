"""avbalance: audio-visual preprocessing to WebDataset shards and modality-balanced training."""

__version__ = "0.1.0"
