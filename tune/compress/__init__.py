"""The compress stage: a multi-objective Ray Tune + Optuna sweep over compressions of the trained model."""
