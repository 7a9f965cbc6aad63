"""Preprocessing stages, one module per stage, registered by name in ``base.STAGES``."""
