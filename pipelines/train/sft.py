"""Prompt/response pairs -> fixed-length examples whose labels cover the response only (Ray Data).

A pair becomes ``prompt_tokens + response_tokens + eos``, padded to ``seq_len``; ``labels`` is
``-100`` (ignored by the loss) on the prompt and the padding, so the model learns to answer, not to
repeat questions. Lines that are not JSON objects with a usable prompt and response are kept aside
with a reason.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.train.config import SftConfig

IGNORE_INDEX = -100


def encode_pair(tokenizer, prompt: str, response: str, config: SftConfig) -> tuple[np.ndarray, np.ndarray, str]:
    """(input_ids, labels, reject reason or ""); both arrays have ``seq_len`` entries."""
    if config.use_chat_template and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= config.seq_len:
        return np.empty(0, np.int32), np.empty(0, np.int32), f"prompt of {len(prompt_ids)} tokens fills seq_len"
    ids = (prompt_ids + response_ids)[: config.seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: config.seq_len]
    padding = config.seq_len - len(ids)
    input_ids = np.array(ids + [tokenizer.pad_token_id] * padding, dtype=np.int32)
    return input_ids, np.array(labels + [IGNORE_INDEX] * padding, dtype=np.int32), ""


class EncodePairs:
    """Ray Data batch UDF: tokenizer loaded once per actor."""

    def __init__(self, tokenizer_dir: str, config: dict[str, Any]):
        from pipelines.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.config = SftConfig.model_validate(config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        config = self.config
        out: dict[str, list] = {"input_ids": [], "labels": [], "reason": [], "record": [], "held_out": []}
        for line in batch["text"]:
            ids, labels, reason, prompt = np.empty(0, np.int32), np.empty(0, np.int32), "", ""
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                record, reason = None, f"malformed JSON: {err.msg}"
            if record is not None and not isinstance(record, dict):
                reason = "line is not a JSON object"
            elif record is not None:
                prompt, response = record.get(config.prompt_field), record.get(config.response_field)
                if not isinstance(prompt, str) or not prompt.strip():
                    reason = f"no text in '{config.prompt_field}'"
                elif not isinstance(response, str) or not response.strip():
                    reason = f"no text in '{config.response_field}'"
                else:
                    ids, labels, reason = encode_pair(self.tokenizer, prompt, response, config)
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["reason"].append(reason)
            out["record"].append(line[:2000])
            # A stable hash (not Python's salted hash): the same split in every process and run.
            out["held_out"].append(zlib.crc32(str(prompt).encode()) % 10_000 < config.val_fraction * 10_000)
        return out


def sft_datasets(config: SftConfig, tokenizer_dir: str):
    """(train, val or None, rejects) Ray Datasets of encoded pairs."""
    import ray.data

    path = Path(config.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"train.sft.path: {path} does not exist")
    encoded = (
        ray.data.read_text(str(path), drop_empty_lines=True)
        .map_batches(
            EncodePairs,
            fn_constructor_kwargs={"tokenizer_dir": tokenizer_dir, "config": config.model_dump(mode="json")},
            concurrency=1,
            batch_size=256,
        )
        .materialize()
    )
    columns = ["input_ids", "labels"]
    train = encoded.filter(lambda row: not row["reason"] and not row["held_out"]).select_columns(columns)
    val = encoded.filter(lambda row: not row["reason"] and row["held_out"]).select_columns(columns)
    rejects = encoded.filter(lambda row: bool(row["reason"])).select_columns(["reason", "record"])
    val = val.materialize()
    return train.materialize(), (val if val.count() else None), rejects.materialize()
