"""Experiments: sweeps of training runs and the report that compares them."""
