"""Clip manifests: parse corpus file names, join metadata, build splits."""
