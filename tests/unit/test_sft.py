"""SFT examples: the loss sees the response (and its end) only; LoRA/SFT configs name their problems."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.recipe import ConfigError, load_config
from pipelines.model.tokenizer import load_tokenizer, train_bpe
from pipelines.train.config import SftConfig
from pipelines.train.sft import IGNORE_INDEX, EncodePairs, encode_pair
from tests.conftest import TINY


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    texts = ["def add(a, b):\n    return a + b\n", "The answer is forty two.", "What is the answer?"] * 50
    return train_bpe(texts, 300, tmp_path_factory.mktemp("tok"))


def test_labels_cover_the_response_and_eos_only(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    config = SftConfig(path="unused", seq_len=64, use_chat_template=False)
    ids, labels, reason = encode_pair(tokenizer, "What is the answer?", " The answer is forty two.", config)
    assert reason == "" and ids.shape == labels.shape == (64,)
    prompt_len = len(tokenizer("What is the answer?", add_special_tokens=False)["input_ids"])
    response = tokenizer(" The answer is forty two.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    end = prompt_len + len(response)
    assert (labels[:prompt_len] == IGNORE_INDEX).all()
    assert labels[prompt_len:end].tolist() == ids[prompt_len:end].tolist() == response
    assert (labels[end:] == IGNORE_INDEX).all() and (ids[end:] == tokenizer.pad_token_id).all()


def test_chat_template_wraps_the_prompt_and_long_prompts_are_refused(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    ids, labels, _ = encode_pair(tokenizer, "What is the answer?", "forty two", SftConfig(path="x", seq_len=64))
    text = tokenizer.decode(ids[labels == IGNORE_INDEX], skip_special_tokens=False)
    assert text.startswith("<|im_start|>user\nWhat is the answer?<|im_end|>\n<|im_start|>assistant\n")
    _, _, reason = encode_pair(tokenizer, "What is the answer? " * 40, "x", SftConfig(path="x", seq_len=16))
    assert reason.startswith("prompt of") and "fills seq_len" in reason


def test_bad_lines_get_reasons_and_the_split_is_stable(tokenizer_dir):
    encode = EncodePairs(str(tokenizer_dir), SftConfig(path="x", seq_len=32, val_fraction=0.5).model_dump())
    lines = [
        '{"prompt": "p1", "response": "r1"}',
        "{broken",
        "[1]",
        '{"prompt": "p2"}',
        '{"prompt": "", "response": "r"}',
    ]
    out = encode({"text": np.array(lines, dtype=object)})
    assert out["reason"][0] == "" and out["reason"][1].startswith("malformed JSON")
    assert out["reason"][2:] == ["line is not a JSON object", "no text in 'response'", "no text in 'prompt'"]
    again = encode({"text": np.array(lines, dtype=object)})
    assert out["held_out"] == again["held_out"]


def test_lora_and_sft_need_a_model_to_start_from():
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, ["train.lora={rank: 4}", "train.sft={path: pairs.jsonl}", "train.zero_stage=3"])
    keys = {key for key, _ in caught.value.problems}
    assert keys == {"train.lora", "train.sft"}, caught.value.problems
    assert "init_from" in str(caught.value) and "ZeRO-3" in str(caught.value)


def test_continuing_on_shards_of_another_tokenizer_is_refused(tokenizer_dir, tmp_path):
    from pipelines.train.trainer import check_same_tokenizer

    check_same_tokenizer(tokenizer_dir, tokenizer_dir)
    other = train_bpe(["completely different text, other merges"] * 40, 280, tmp_path / "other")
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        check_same_tokenizer(tokenizer_dir, other)
