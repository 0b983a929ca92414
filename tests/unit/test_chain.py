"""Stage bookkeeping: completed stages are skipped, changed configs refused, services always run."""

from __future__ import annotations

import pytest

from pipelines.chain import STAGES, StageConfigChangedError, chain_stages, run_stage
from pipelines.config import config_hash, load_config
from pipelines.runs import RunDir, StageResult
from tests.conftest import TINY


def complete(config, stage):
    run = RunDir(config.run_dir())
    run.begin(stage)
    run.complete(stage, config_hash(STAGES[stage].hashed(config)), StageResult())
    return run


def test_completed_stage_is_skipped_without_touching_ray(tmp_path, capsys):
    config = load_config(TINY, [f"storage={tmp_path}", "run_name=again"])
    complete(config, "data")
    assert run_stage("data", config) is None
    assert "already complete" in capsys.readouterr().out


def test_changed_config_is_refused_with_the_way_out(tmp_path):
    config = load_config(TINY, [f"storage={tmp_path}", "run_name=again"])
    complete(config, "train")
    changed = load_config(TINY, [f"storage={tmp_path}", "run_name=again", "train.lr=1e-4"])
    with pytest.raises(StageConfigChangedError, match="--force"):
        run_stage("train", changed)


def test_train_hash_ignores_serve_changes():
    a = load_config(TINY)
    b = load_config(TINY, ["serve.port=9000"])
    assert config_hash(STAGES["train"].hashed(a)) == config_hash(STAGES["train"].hashed(b))


def test_chain_order_and_tune_switch():
    assert chain_stages(load_config(TINY)) == ["data", "train", "tune", "serve"]
    assert chain_stages(load_config(TINY, ["tune.enabled=false"])) == ["data", "train", "serve"]
    assert STAGES["serve"].always_runs and not STAGES["data"].always_runs
