"""Stage bookkeeping: completed stages are skipped, changed configs refused, services always run,
and a stage's key chains its upstream stages' keys."""

from __future__ import annotations

import dataclasses
import functools

import pytest

from cluster.chain import (
    STAGES,
    Keys,
    StageConfigChangedError,
    chain_stages,
    own_hash,
    run_stage,
    stage_key,
    upstream_keys,
)
from cluster.recipe import load_config
from pipelines.artifacts import TuneBest
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


def test_an_upstream_change_reruns_downstream_naming_it(tmp_path, fake_stages, capsys):
    base = [f"storage={tmp_path}", "run_name=chained"]
    config = load_config(TINY, base)
    for name in ("data", "tune", "train"):
        run_stage(name, config)
    assert fake_stages == ["data", "tune", "train"]

    # `loom data --force` with another data config: the shards the sweep and the model were built on are gone.
    changed = load_config(TINY, [*base, "data.seq_len=64"])
    run_stage("data", changed, force=True)
    # train is not built on the stale sweep: tune has to run again first, and the error says why.
    with pytest.raises(
        StageConfigChangedError, match="depends on stage 'tune'.*upstream stage 'data' changed.*loom tune"
    ):
        run_stage("train", changed)
    # The recipe the old stages were built from no longer matches the data on disk either.
    with pytest.raises(StageConfigChangedError, match="depends on stage 'data'.*completed under another config"):
        run_stage("serve", config)

    capsys.readouterr()
    assert run_stage("tune", changed)["metrics"] == {"ran": "tune"}
    assert "tune: upstream stage 'data' changed" in capsys.readouterr().out
    assert run_stage("train", changed)["metrics"] == {"ran": "train"}
    assert "train: upstream stage 'data' changed" in capsys.readouterr().out
    record = RunDir(changed.run_dir()).manifest()["stages"]["train"]
    assert record["upstream"] == {"data": stage_key("data", changed), "tune": stage_key("tune", changed)}
    assert record["key"] == stage_key("train", changed)
    assert run_stage("train", changed) is None  # rebuilt on the new data and sweep: complete again
    assert fake_stages == ["data", "tune", "train", "data", "tune", "train"]


def test_stage_on_a_stale_upstream_is_refused_before_it_runs(tmp_path, fake_stages):
    base = [f"storage={tmp_path}", "run_name=stale"]
    run_stage("data", load_config(TINY, base))
    with pytest.raises(StageConfigChangedError, match="depends on stage 'data'"):
        run_stage("train", load_config(TINY, [*base, "data.seq_len=64"]))
    assert fake_stages == ["data"]


def test_chain_order_and_sweep_switches():
    assert chain_stages(load_config(TINY)) == ["data", "tune", "train", "compress", "eval", "serve"]
    assert chain_stages(load_config(TINY, ["tune.enabled=false", "compress.enabled=false"])) == [
        "data",
        "train",
        "eval",
        "serve",
    ]
    assert "eval" not in chain_stages(load_config(TINY, ["eval.enabled=false"]))
    assert STAGES["serve"].always_runs and not STAGES["data"].always_runs


def test_train_key_follows_the_sweep_only_while_it_is_on():
    swept = load_config(TINY)
    narrower = load_config(TINY, ["tune.space={train.lr: {kind: loguniform, low: 0.006, high: 0.01}}"])
    assert upstream_keys("train", swept).keys() == {"data", "tune"}
    assert own_hash("train", swept) == own_hash("train", narrower)
    assert stage_key("train", swept) != stage_key("train", narrower)  # another sweep: another training run
    off = load_config(TINY, ["tune.enabled=false"])
    assert upstream_keys("train", off).keys() == {"data"}
    assert stage_key("train", off) == stage_key("train", load_config(TINY, ["tune.enabled=false", "tune.num_trials=9"]))


def test_train_takes_the_best_trial_and_needs_the_sweep_first(tmp_path, capsys):
    import json

    from cluster.chain import tuned_train_config
    from cluster.cli import main
    from pipelines.artifacts import MissingInputError

    config = load_config(TINY, [f"storage={tmp_path}", "run_name=handoff"])
    run = RunDir(config.run_dir())
    with pytest.raises(MissingInputError, match="run `loom tune` first.*tune.enabled=false"):
        tuned_train_config(config, run)
    complete(config, "tune")
    (run.stage_dir("tune") / "best.json").write_text(json.dumps({"best": {"lr": 0.01}}))  # an earlier format
    with pytest.raises(MissingInputError, match="loom tune --force"):
        tuned_train_config(config, run)
    best = {"trial_id": "a1b2", "params": {"train.lr": 0.0123, "train.model.num_layers": 3}, "val_loss": 5.0}
    (run.stage_dir("tune") / "best.json").write_text(json.dumps({"metric": "val_loss", "best": best}))
    train, tuned = tuned_train_config(config, run)
    assert main(["validate", str(TINY), f"storage={tmp_path}", "run_name=handoff"]) == 0
    assert "best trial a1b2: {'train.lr': 0.0123" in capsys.readouterr().out
    assert (train.lr, train.model.num_layers, train.max_steps) == (0.0123, 3, config.train.max_steps)
    assert tuned == {"params": best["params"], "trial_id": "a1b2", "val_loss": 5.0}
    assert tuned_train_config(load_config(TINY, [f"storage={tmp_path}", "tune.enabled=false"]), run) == (
        load_config(TINY).train,
        None,
    )


def _jsonl_recipe(tmp_path, corpus):
    source = f"data.sources=[{{format: jsonl, path: '{corpus}', name: docs}}]"
    return [f"storage={tmp_path / 'runs'}", "run_name=grown", source]


def test_appending_to_a_source_reruns_data_and_downstream_naming_the_input(tmp_path, fake_stages, capsys, monkeypatch):
    import json

    import pipelines.data.readers as readers

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(100)))
    config = load_config(TINY, _jsonl_recipe(tmp_path, corpus))
    for name in ("data", "tune", "train"):
        run_stage(name, config)

    # Unchanged: everything is skipped, and checking the corpus reads no file's contents (listing only).
    read: list[str] = []
    digest = readers._file_digest
    monkeypatch.setattr(readers, "_file_digest", lambda path: read.append(path) or digest(path))
    capsys.readouterr()
    assert all(run_stage(name, config) is None for name in ("data", "tune", "train"))
    assert read == []

    with corpus.open("a") as handle:  # 100 more documents
        handle.write("".join(json.dumps({"text": f"appended document {i}"}) + "\n" for i in range(100)))
    assert run_stage("data", config)["metrics"] == {"ran": "data"}
    out = capsys.readouterr().out
    assert "data: input 'sources' changed" in out and "running it again" in out
    assert read == [str(corpus)]  # the changed file, read once
    assert run_stage("tune", config) is not None and run_stage("train", config) is not None
    assert "upstream stage 'data' changed" in capsys.readouterr().out
    assert fake_stages == ["data", "tune", "train"] * 2

    # A touched file (same bytes, new modification time) is the same input.
    corpus.touch()
    assert run_stage("data", config) is None


def test_a_sweep_with_another_winner_reruns_train_and_the_same_winner_does_not(tmp_path, monkeypatch, capsys):
    import json

    winners = iter([{"train.lr": 0.001}, {"train.lr": 0.002}, {"train.lr": 0.002}])
    ran: list[str] = []

    def tune(cfg, run):
        ran.append("tune")
        best = {"trial_id": f"t{len(ran)}", "params": next(winners), "val_loss": 5.0}
        run.begin("tune")
        TuneBest.write(run, {"metric": "val_loss", "best": best})
        return StageResult()

    def train(cfg, run):
        ran.append("train")
        return StageResult(outputs={"model_hash": f"model-{len(ran)}"})

    def other(cfg, run, name="?"):
        ran.append(name)
        return StageResult()

    for name, work in {"data": functools.partial(other, name="data"), "tune": tune, "train": train}.items():
        monkeypatch.setitem(STAGES, name, dataclasses.replace(STAGES[name], run=work))
    config = load_config(TINY, [f"storage={tmp_path}", "run_name=winner"])
    for name in ("data", "tune", "train"):
        run_stage(name, config)

    run_stage("tune", config, force=True)  # another winner
    capsys.readouterr()
    assert run_stage("train", config) is not None
    assert "train: input 'tune.best' changed" in capsys.readouterr().out
    record = RunDir(config.run_dir()).manifest()["stages"]["train"]
    assert record["read"]["tune.best"] == TuneBest.fingerprint(RunDir(config.run_dir()))
    assert json.loads(TuneBest.path_in(RunDir(config.run_dir())).read_text())["best"]["params"] == {"train.lr": 0.002}

    run_stage("tune", config, force=True)  # the sweep again, the same winner: the model stands
    assert run_stage("train", config) is None
    assert ran == ["data", "tune", "train", "tune", "train", "tune"]


def test_compress_key_follows_the_trained_model(tmp_path, fake_stages, monkeypatch):
    hashes = iter(["aaaa", "bbbb"])

    def train(cfg, run):
        fake_stages.append("train")
        return StageResult(outputs={"model_hash": next(hashes)})

    monkeypatch.setitem(STAGES, "train", dataclasses.replace(STAGES["train"], run=train))
    config = load_config(TINY, [f"storage={tmp_path}", "run_name=model", "tune.enabled=false"])
    for name in ("data", "train", "compress"):
        run_stage(name, config)
    run_stage("train", config, force=True)  # retrained: another model
    # train's config and upstream are the same: only the model it wrote differs, and compress runs again.
    assert Keys(config).changes("compress") == ([], ["input 'train.model' changed (aaaa -> bbbb)"])
    assert run_stage("compress", config) is not None
    assert fake_stages == ["data", "train", "compress", "train", "compress"]


def test_switching_the_sweep_off_reruns_train_naming_it(tmp_path, fake_stages, capsys):
    base = [f"storage={tmp_path}", "run_name=switched"]
    for name in ("data", "tune", "train"):
        run_stage(name, load_config(TINY, base))
    capsys.readouterr()
    assert run_stage("train", load_config(TINY, [*base, "tune.enabled=false"])) is not None
    assert "stage 'tune' is no longer upstream (switched off)" in capsys.readouterr().out


def test_a_completed_data_stage_whose_corpus_is_gone_does_not_block_the_stages_after_it(tmp_path, fake_stages):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "one document"}\n')
    config = load_config(TINY, _jsonl_recipe(tmp_path, corpus))
    for name in ("data", "tune"):
        run_stage(name, config)
    corpus.unlink()  # the raw text is archived elsewhere once curated
    assert run_stage("train", config) is not None  # data's recorded fingerprint stands in for the listing
    from pipelines.data.readers import SourceNotFoundError

    with pytest.raises(SourceNotFoundError, match="matches no file"):
        run_stage("data", config, force=True)  # data itself needs its sources


def test_force_on_a_stale_upstream_is_refused_before_anything_is_removed(tmp_path, fake_stages):
    base = [f"storage={tmp_path}", "run_name=forced", "tune.enabled=false"]
    for name in ("data", "train"):
        run_stage(name, load_config(TINY, base))
    changed = load_config(TINY, [*base, "data.seq_len=64"])
    with pytest.raises(StageConfigChangedError, match="depends on stage 'data'"):
        run_stage("train", changed, force=True)
    assert RunDir(changed.run_dir()).is_complete("train")  # the model is still there
