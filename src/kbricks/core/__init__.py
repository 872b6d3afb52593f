"""Foundations with no knowledge of methods or models: distributed helpers, seeding, checkpoints, run directories,
hooks and loggers, statistics over seeds, plots, and accuracy counting."""
