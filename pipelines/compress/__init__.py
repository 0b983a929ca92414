"""Compression of a trained Hugging Face model: each function reads one model directory and writes another
(quantized, pruned), and ``measure`` scores a directory. Plain functions without Ray: the compress stage
(``tune/compress.py``) runs them inside its trials."""
