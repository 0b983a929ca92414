"""Stage bookkeeping: completed stages are skipped, changed configs refused, services always run,
and a stage's key chains its upstream stages' keys."""

from __future__ import annotations

import dataclasses

import pytest

from cluster.chain import STAGES, StageConfigChangedError, chain_stages, own_hash, run_stage, stage_key, upstream_keys
from cluster.recipe import load_config
from pipelines.runs import RunDir, StageResult
from tests.conftest import TINY


def complete(config, stage):
    run = RunDir(config.run_dir())
    run.begin(stage)
    run.complete(stage, stage_key(stage, config), StageResult(), own_hash(stage, config), upstream_keys(stage, config))
    return run


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage's work replaced by a recorder: the bookkeeping is what is tested."""
    ran: list[str] = []
    for name, spec in list(STAGES.items()):

        def work(cfg, run, name=name):
            ran.append(name)
            return StageResult(metrics={"ran": name})

        monkeypatch.setitem(STAGES, name, dataclasses.replace(spec, run=work))
    return ran


def test_completed_stage_is_skipped_without_touching_ray(tmp_path, capsys):
    config = load_config(TINY, [f"storage={tmp_path}", "run_name=again"])
    complete(config, "data")
    assert run_stage("data", config) is None
    assert "already complete" in capsys.readouterr().out


def test_changed_config_is_refused_with_the_way_out(tmp_path):
    config = load_config(TINY, [f"storage={tmp_path}", "run_name=again"])
    complete(config, "train")
    changed = load_config(TINY, [f"storage={tmp_path}", "run_name=again", "train.lr=1e-4"])
    with pytest.raises(StageConfigChangedError, match="its own config changed.*--force"):
        run_stage("train", changed)


def test_train_key_ignores_serve_changes_and_follows_data_changes():
    a = load_config(TINY)
    assert stage_key("train", a) == stage_key("train", load_config(TINY, ["serve.port=9000"]))
    changed_data = load_config(TINY, ["data.seq_len=64"])
    assert own_hash("train", a) == own_hash("train", changed_data)
    assert stage_key("train", a) != stage_key("train", changed_data)
    assert stage_key("tune", a) != stage_key("tune", changed_data)


def test_upstream_change_refuses_downstream_naming_it_and_force_reruns(tmp_path, fake_stages):
    base = [f"storage={tmp_path}", "run_name=chained"]
    config = load_config(TINY, base)
    for name in ("data", "train", "tune"):
        run_stage(name, config)
    assert fake_stages == ["data", "train", "tune"]

    # `loom data --force` with another data config: the shards the model was trained on are gone.
    changed = load_config(TINY, [*base, "data.seq_len=64"])
    run_stage("data", changed, force=True)
    for downstream in ("train", "tune"):
        with pytest.raises(StageConfigChangedError, match="upstream stage 'data' changed.*--force"):
            run_stage(downstream, changed)
    # The recipe the old stages were built from no longer matches the data on disk either.
    with pytest.raises(StageConfigChangedError, match="depends on stage 'data'.*completed under another config"):
        run_stage("serve", config)

    assert run_stage("train", changed, force=True)["metrics"] == {"ran": "train"}
    record = RunDir(changed.run_dir()).manifest()["stages"]["train"]
    assert record["upstream"] == {"data": stage_key("data", changed)} and record["key"] == stage_key("train", changed)
    assert run_stage("train", changed) is None  # rebuilt on the new data: complete again
    assert fake_stages == ["data", "train", "tune", "data", "train"]


def test_stage_on_a_stale_upstream_is_refused_before_it_runs(tmp_path, fake_stages):
    base = [f"storage={tmp_path}", "run_name=stale"]
    run_stage("data", load_config(TINY, base))
    with pytest.raises(StageConfigChangedError, match="depends on stage 'data'"):
        run_stage("train", load_config(TINY, [*base, "data.seq_len=64"]))
    assert fake_stages == ["data"]


def test_chain_order_and_tune_switch():
    assert chain_stages(load_config(TINY)) == ["data", "train", "tune", "serve"]
    assert chain_stages(load_config(TINY, ["tune.enabled=false"])) == ["data", "train", "serve"]
    assert STAGES["serve"].always_runs and not STAGES["data"].always_runs
