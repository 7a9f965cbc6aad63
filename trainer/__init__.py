"""Streaming multimodal trainer with modality-balancing methods."""
