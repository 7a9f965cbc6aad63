"""Corpus recipes (lhotse style): one module per corpus, thin CLI wrappers call them."""
