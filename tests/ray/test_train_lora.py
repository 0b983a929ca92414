"""LoRA supervised fine-tuning of the trained model: only the adapters change, the loss counts the
response, and the merged export is a plain Hugging Face model (tests/ray/test_serve.py serves it)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.ray


def test_lora_sft_changes_only_low_rank_adapters_of_the_target_layers(lora_done, train_done):
    import torch
    from safetensors.torch import load_file

    config, record = lora_done
    assert record["metrics"]["last_loss"] < record["metrics"]["first_loss"]
    assert record["inputs"]["init_from"] and record["inputs"]["sft_pairs"]
    adapter = json.loads((Path(record["outputs"]["adapter"]) / "adapter_config.json").read_text())
    assert (adapter["r"], sorted(adapter["target_modules"])) == (4, ["q_proj", "v_proj"])

    base = load_file(Path(train_done["outputs"]["model"]) / "model.safetensors")
    merged = load_file(Path(record["outputs"]["model"]) / "model.safetensors")
    assert set(base) == set(merged)  # a plain model: no adapter tensors left after merging
    changed = 0
    for name, weight in base.items():
        delta = merged[name] - weight
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            assert delta.abs().max() > 0, f"{name} did not train"
            assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 4, f"{name}: update of rank > r"
            changed += 1
        else:
            assert torch.equal(delta, torch.zeros_like(delta)), f"{name} changed but has no adapter"
    assert changed == 2 * config.train.model.num_layers

    trainable = [json.loads(line) for line in Path(record["outputs"]["metrics"]).read_text().splitlines()]
    row = next(r for r in trainable if "trainable_parameters" in r)
    assert 0 < row["trainable_parameters"] < row["parameters"] / 10


def test_sft_rejects_bad_lines_with_reasons(lora_done):
    config, _ = lora_done
    rejects = pq.read_table(config.run_dir() / "train" / "sft_rejects").to_pylist()
    reasons = sorted(r["reason"] for r in rejects)
    assert len(reasons) == 2 and reasons[0].startswith("malformed JSON") and reasons[1] == "no text in 'response'"


def test_continued_pretraining_starts_from_the_given_model(train_done, tiny_config, tmp_path):
    """train.init_from on the packed shards (tokenized with that model's tokenizer): the first loss is the
    trained model's, far below a fresh model's, and training goes on from there. It is also the ZeRO matrix's
    stage-0 case (tests/ray/test_train_matrix.py), and reads rank 0's gauges from Prometheus while it trains."""
    import threading

    from pipelines.train.config import TrainConfig
    from pipelines.train.stage import read_loss_curve
    from tests.training import fit, watch_train_gauges

    fresh = read_loss_curve(Path(train_done["outputs"]["metrics"]))
    config = TrainConfig.model_validate(
        {
            **tiny_config.train.model_dump(),
            "init_from": train_done["outputs"]["model"],
            "zero_stage": 0,
            "max_steps": 4,
            "log_every": 1,
            "checkpoint_every": 4,
            "eval_every": 0,
        }
    )
    seen: list[float] = []
    done = threading.Event()
    watcher = threading.Thread(target=watch_train_gauges, args=("continued", seen, done), daemon=True)
    watcher.start()
    try:
        result, history = fit(config, tiny_config, tmp_path, "continued")
    finally:
        done.set()
    watcher.join(timeout=120)
    assert seen and max(seen) >= 1, "ray_loom_train_step never reached Prometheus during training"
    curve = read_loss_curve(history)
    assert result.error is None and [p["step"] for p in curve] == [1, 2, 3, 4]
    # A fresh model starts near ln(vocab); this one starts where the first run ended (other batches: ± noise).
    assert curve[0]["loss"] < fresh[0]["loss"] - 0.5, (curve[0], fresh[0])
    assert abs(curve[0]["loss"] - fresh[-1]["loss"]) < 0.3, (curve[0], fresh[-1])
    # Its optimizer stepped: the exported weights moved from the ones it started from.
    from safetensors.torch import load_file

    assert result.checkpoint.to_directory(str(tmp_path / "export")) is not None
    started = load_file(Path(train_done["outputs"]["model"]) / "model.safetensors")
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert set(exported) == set(started)
    assert any(not exported[name].equal(weight) for name, weight in started.items()), "no weight changed"
