"""Structured pruning of a Llama: whole attention head groups and MLP channels removed by importance,
the same number in every layer, so the result is a smaller dense Llama that transformers and vLLM load.

Importance is measured on calibration rows (the run's held-out tokens), as Minitron does: a head group
scores the mean norm of its heads' outputs (the input of ``o_proj``) times the norm of the ``o_proj``
columns that read them; an MLP channel scores the mean magnitude of its activation (the input of
``down_proj``) times the norm of its ``down_proj`` column. Each layer keeps its own best ones.

Written here rather than with torch-pruning: a Llama's coupled dimensions are four known slices per
layer, and vLLM needs every layer to keep the same shape, which is what this states directly.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.compress.files import copy_tokenizer


def pruned_shape(config, heads_kept: float, mlp_kept: float, multiple: int = 16) -> tuple[int, int]:
    """(key-value head groups, MLP channels) kept per layer for the given fractions.

    Groups: the count nearest the fraction (at least one) among those whose heads divide hidden_size, which
    transformers requires of a Llama. MLP width: a multiple of ``multiple``, at least one, at most the model's.
    """
    group = config.num_attention_heads // config.num_key_value_heads
    allowed = [g for g in range(1, config.num_key_value_heads + 1) if config.hidden_size % (g * group) == 0]
    wanted = heads_kept * config.num_key_value_heads
    groups = min(allowed, key=lambda g: (abs(g - wanted), -g))
    width = max(multiple, round(mlp_kept * config.intermediate_size / multiple) * multiple)
    return groups, min(width, config.intermediate_size)


def _importances(model, calibration: list[list[int]]):
    """Per layer: the score of every key-value head group and of every MLP channel on ``calibration``."""
    import torch

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = {i: torch.zeros(config.num_attention_heads) for i in range(config.num_hidden_layers)}
    channels = {i: torch.zeros(config.intermediate_size) for i in range(config.num_hidden_layers)}

    def on_heads(i):
        def hook(module, args):
            out = args[0].detach().float().reshape(-1, config.num_attention_heads, head_dim)
            heads[i] += out.norm(dim=-1).mean(dim=0)

        return hook

    def on_channels(i):
        def hook(module, args):
            channels[i] += args[0].detach().float().reshape(-1, config.intermediate_size).abs().mean(dim=0)

        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_channels(i)))
    model.eval()
    with torch.no_grad():
        for row in calibration:
            model(torch.tensor([row], dtype=torch.long))
    for hook in hooks:
        hook.remove()
    group = config.num_attention_heads // config.num_key_value_heads
    scores = {}
    for i, layer in enumerate(model.model.layers):
        o_columns = layer.self_attn.o_proj.weight.detach().float().reshape(-1, config.num_attention_heads, head_dim)
        head_score = heads[i] * o_columns.norm(dim=(0, 2))
        down_columns = layer.mlp.down_proj.weight.detach().float().norm(dim=0)
        scores[i] = (head_score.reshape(config.num_key_value_heads, group).sum(dim=1), channels[i] * down_columns)
    return scores, head_dim, group


def prune_structured(
    source: Path, destination: Path, heads_kept: float, mlp_kept: float, calibration: list[list[int]]
) -> Path:
    """A copy of the Llama in ``source`` keeping the given fractions of head groups and MLP channels."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = model.config
    if config.model_type != "llama":
        raise ValueError(f"structured pruning handles Llama models; {source} is a {config.model_type}")
    if not calibration:
        raise ValueError("structured pruning needs calibration rows to score heads and channels")
    groups, width = pruned_shape(config, heads_kept, mlp_kept)
    scores, head_dim, group = _importances(model, calibration)
    state = model.state_dict()
    for i, (group_score, channel_score) in scores.items():
        keep_groups = torch.topk(group_score, groups).indices.sort().values
        keep_heads = (keep_groups[:, None] * group + torch.arange(group)).reshape(-1)
        q_rows = (keep_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        kv_rows = (keep_groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
        keep_channels = torch.topk(channel_score, width).indices.sort().values
        prefix = f"model.layers.{i}."
        state[prefix + "self_attn.q_proj.weight"] = state[prefix + "self_attn.q_proj.weight"][q_rows]
        for name in ("k_proj", "v_proj"):
            state[prefix + f"self_attn.{name}.weight"] = state[prefix + f"self_attn.{name}.weight"][kv_rows]
        state[prefix + "self_attn.o_proj.weight"] = state[prefix + "self_attn.o_proj.weight"][:, q_rows]
        for name in ("gate_proj", "up_proj"):
            state[prefix + f"mlp.{name}.weight"] = state[prefix + f"mlp.{name}.weight"][keep_channels]
        state[prefix + "mlp.down_proj.weight"] = state[prefix + "mlp.down_proj.weight"][:, keep_channels]
        if config.attention_bias or config.mlp_bias:
            raise ValueError("structured pruning handles Llamas without attention or MLP biases")
    config.num_attention_heads = groups * group
    config.num_key_value_heads = groups
    config.head_dim = head_dim  # explicit: heads x head_dim no longer equals hidden_size
    config.intermediate_size = width
    pruned = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pruned.load_state_dict(state, strict=True)
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(destination)
    copy_tokenizer(source, destination)
    return destination
