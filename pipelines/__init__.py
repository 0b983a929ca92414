"""Loom pipelines: configuration, run directories and the data/train stages."""
