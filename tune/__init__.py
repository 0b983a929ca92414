"""Hyperparameter sweeps: Ray Tune + Optuna, one Ray Train run per trial."""
