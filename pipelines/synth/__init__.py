"""A CREMA-D-shaped synthetic corpus with per-modality signal-strength knobs."""
