"""Compression of a trained Hugging Face model: each function reads one model directory and writes another
(quantized, pruned), and ``measure`` scores a directory. Plain functions without Ray; the compress stage
(``stage.py``, a Ray Tune + Optuna sweep over them) runs them inside its trials."""
