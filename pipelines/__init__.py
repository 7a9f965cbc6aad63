"""Stage-wise preprocessing of audio-visual corpora into WebDataset shards."""
