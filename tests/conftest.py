"""Shared fixtures: recipes, free ports, and gpu-test skipping."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO_ROOT / "pipelines" / "recipes").glob("*.yaml"))
TINY = REPO_ROOT / "pipelines" / "recipes" / "tiny.yaml"
#: The tests' model and schedule: smaller than the demo's, so each training run in the tests stays quick.
SMALL_MODEL = [
    "train.model={hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 2, intermediate_size: 256}",
    "train.micro_batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=5",
]

# vLLM's CPU engine sizes its KV cache from this; keep tests small.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
