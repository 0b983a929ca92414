"""What every compression function shares: the files a model directory carries beside its weights."""

from __future__ import annotations

import shutil
from pathlib import Path

#: Tokenizer and chat-template files: copied unchanged, so a variant answers prompts as its base does.
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "*.jinja")


def copy_tokenizer(source: Path, destination: Path) -> None:
    for pattern in _TOKENIZER_FILES:
        for path in Path(source).glob(pattern):
            shutil.copy2(path, Path(destination) / path.name)


def weight_bytes(model_dir: Path) -> int:
    """Bytes on disk of a model's weights (every safetensors file)."""
    return sum(path.stat().st_size for path in Path(model_dir).glob("*.safetensors"))
