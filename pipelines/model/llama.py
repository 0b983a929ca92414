"""Build the Llama models Loom trains from scratch, and export them for transformers and vLLM."""

from __future__ import annotations

from pathlib import Path

from pipelines.model.config import ModelConfig


def llama_config(config: ModelConfig, vocab_size: int, eos_token_id: int, pad_token_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_llama(config: ModelConfig, tokenizer_dir: str | Path, seed: int):
    """A randomly initialised LlamaForCausalLM sized for the tokenizer in ``tokenizer_dir``."""
    import torch
    from transformers import LlamaForCausalLM

    from pipelines.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)  # identical initial weights on every rank
    hf_config = llama_config(config, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    return LlamaForCausalLM(hf_config)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def export_hf(model, state_dict, tokenizer_dir: str | Path, output_dir: str | Path) -> Path:
    """Write a Hugging Face directory (safetensors + tokenizer + generation config)."""
    from transformers import GenerationConfig

    from pipelines.model.tokenizer import load_tokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.save_pretrained(output_dir)
    GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(output_dir)
    return output_dir
