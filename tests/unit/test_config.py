"""The root config: every shipped recipe loads, every mistake is reported with its key."""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.recipe import ConfigError, LoomConfig, config_hash, load_config, parse_overrides
from tests.conftest import RECIPES, TINY


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    config = load_config(recipe)
    assert isinstance(config, LoomConfig)
    assert config.data.seq_len <= config.train.model.max_position_embeddings


def test_both_required_recipes_ship():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "gpu-125m.yaml"}


def test_gpu_recipe_is_realistic():
    config = load_config(TINY.parent / "gpu-125m.yaml")

    m = config.train.model
    # Llama parameter count without embeddings, plus tied embeddings for a 32k vocabulary.
    per_layer = 4 * m.hidden_size**2 + 3 * m.hidden_size * m.intermediate_size
    total = m.num_layers * per_layer + config.data.vocab_size * m.hidden_size
    assert 100e6 < total < 160e6
    assert (config.train.zero_stage, config.train.precision, config.train.use_gpu) == (2, "bf16", True)
    assert config.serve.models["loom-125m"].accelerator == "gpu"


def test_three_mistakes_are_all_reported(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(TINY.read_text().replace("num_workers: 2", "num_workers: -2").replace("lr: 1.0e-2", "lr: fast"))
    recipe.write_text(recipe.read_text() + "\nextra_section: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    keys = {key for key, _ in err.value.problems}
    assert keys == {"train.num_workers", "train.lr", "extra_section"}
    text = str(err.value)
    assert "at least 1 worker (got -2)" in text and "unknown key" in text and "'fast'" in text


def test_dotted_overrides_apply_and_typos_are_named():
    config = load_config(TINY, ["train.lr=3e-4", "data.seq_len=64", "tune.enabled=false"])
    assert (config.train.lr, config.data.seq_len, config.tune.enabled) == (3e-4, 64, False)
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["train.learning_rate=1", "nonsense"])
    assert {key for key, _ in err.value.problems} == {"nonsense", "train.learning_rate"}


def test_an_overriding_distribution_replaces_the_recipes():
    """tiny.yaml's train.lr is a loguniform range; a choice given over it keeps none of the range's bounds."""
    config = load_config(TINY, ["tune.space={train.lr: {kind: choice, values: [0.001, 0.002]}}"])
    lr = config.tune.space["train.lr"]
    assert (lr.kind, lr.values, lr.low, lr.high) == ("choice", [0.001, 0.002], None, None)
    widened = load_config(TINY, ["train.model={num_layers: 3}"])  # sections still merge key by key
    assert widened.train.model.num_layers == 3 and widened.train.model.hidden_size == 128


def test_parse_overrides_nests_and_parses_yaml_scalars():
    nested, problems = parse_overrides(["a.b.c=1", "a.d=[1, 2]", "e=true"])
    assert problems == []
    assert nested == {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": True}


@pytest.mark.parametrize(
    "override, key",
    [
        (["train.precision=fp16"], "train.precision"),  # fp16 needs a GPU
        (["tune.space={train.lr: {kind: loguniform, low: 0.1, high: 0.01}}"], "tune.space.train.lr"),
        (["serve.models.loom-tiny.autoscaling.min_replicas=3"], "serve.models.loom-tiny.autoscaling"),
        (["data.seq_len=512"], "train.model.max_position_embeddings"),
        (["train.model.num_heads=8", "train.model.num_kv_heads=8"], "train.model"),  # head size 16: not on vLLM CPU
        (["train.model.num_heads=3"], "train.model"),
        (["storage=s3://bucket/runs"], ""),
        (["tune.grace_period_steps=9"], "tune"),  # ASHA's first rung after the trials' last step (8)
        (["tune.reduction_factor=1"], "tune.reduction_factor"),
    ],
)
def test_impossible_combinations_are_rejected(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, override)
    assert key in {k for k, _ in err.value.problems}


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_cli_exits_2_and_names_the_key(tmp_path, capsys):
    assert main(["validate", str(TINY), "train.num_workers=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.num_workers" in err and "nothing was started" in err
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "recipe file not found" in capsys.readouterr().err
    assert main(["validate", str(TINY)]) == 0


def test_config_hash_is_stable_and_sensitive():
    a, b = load_config(TINY), load_config(TINY, ["train.lr=1e-3"])
    assert config_hash(a.train) == config_hash(load_config(TINY).train)
    assert config_hash(a.train) != config_hash(b.train)
    assert config_hash(a.data) == config_hash(b.data)


def test_every_field_has_a_description():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            annotation = field.annotation
            for candidate in getattr(annotation, "__args__", (annotation,)):
                if isinstance(candidate, type) and hasattr(candidate, "model_fields"):
                    walk(candidate, f"{prefix}{name}.")

    walk(LoomConfig)


def test_defaults_validate_and_an_empty_recipe_needs_only_a_source(tmp_path):
    from cluster.recipe import validate_dict

    defaults = validate_dict({})
    assert defaults.stage_problems(["data", "tune", "train", "serve"]) == []
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("data:\n  sources:\n    - {format: jsonl, path: corpus.jsonl, name: mine}\n")
    config = load_config(recipe)
    assert config.data.sources[0].path == "corpus.jsonl" and config.train.model.hidden_size // 2 == 32


def test_a_stage_is_checked_for_what_it_uses(tmp_path):
    # A model vLLM on CPU cannot serve does not stop the data stage, nor training; serving refuses it.
    unservable = ["train.model.num_heads=8", "train.model.num_kv_heads=8"]
    load_config(TINY, unservable, stages=["data"])
    load_config(TINY, unservable, stages=["train"])
    with pytest.raises(ConfigError, match="cannot be served by vLLM on CPU"):
        load_config(TINY, unservable, stages=["serve"])
    assert main(["validate", str(TINY), *unservable]) == 2


def test_a_search_space_is_refused_before_any_trial_names_its_key():
    def problems(space: str, *more: str) -> dict[str, str]:
        with pytest.raises(ConfigError) as err:
            load_config(TINY, [f"tune.space={space}", *more], stages=["tune"])
        return dict(err.value.problems)

    assert (
        "no field 'learning_rate'"
        in problems("{train.learning_rate: {kind: uniform, low: 0.1, high: 0.2}}")["tune.space.train.learning_rate"]
    )
    assert (
        "no section 'optimizer'"
        in problems("{train.optimizer.beta1: {kind: uniform, low: 0.8, high: 0.99}}")[
            "tune.space.train.optimizer.beta1"
        ]
    )
    # An end of the range train itself refuses (lr <= 1), or a choice it refuses (fp16 on CPU).
    assert (
        "train.lr=2.0 would be refused"
        in problems("{train.lr: {kind: loguniform, low: 0.001, high: 2.0}}")["tune.space.train.lr"]
    )
    assert (
        "precision" in problems("{train.precision: {kind: choice, values: [fp32, fp16]}}")["tune.space.train.precision"]
    )
    # A micro-batch that does not divide the recipe's global batch (16 x 2 workers = 32 sequences).
    assert (
        "not a whole number"
        in problems("{train.micro_batch_size: {kind: choice, values: [16, 24]}}")["tune.space.train.micro_batch_size"]
    )
    assert "train.* keys only" in str(problems("{data.seq_len: {kind: int, low: 64, high: 128}}"))
    assert "low and high" in str(problems("{train.lr: {kind: uniform, values: [0.1]}}"))
    # The same space is fine for a stage that does not sweep.
    load_config(TINY, ["tune.space={train.lr: {kind: loguniform, low: 0.001, high: 2.0}}"], stages=["data"])


def test_a_trial_keeps_the_global_batch_and_takes_its_values():
    from tune.config import trial_of

    config = load_config(
        TINY,
        [
            "tune.space={train.lr: {kind: loguniform, low: 0.001, high: 0.01}, train.model.num_layers: {kind: int, low: 1, high: 3}}"
        ],
    )
    assert config.train.effective_global_batch_size == 32  # 16 x 1 x 2 workers
    trial = trial_of(config.train, config.tune, {"train.lr": 0.005, "train.model.num_layers": 3})
    assert (trial.lr, trial.model.num_layers, trial.model.hidden_size) == (0.005, 3, config.train.model.hidden_size)
    # One worker per trial: accumulation doubles, so the trial steps on the recipe's 32 sequences.
    assert (trial.num_workers, trial.gradient_accumulation_steps, trial.effective_global_batch_size) == (1, 2, 32)
    assert trial.max_steps == config.tune.max_steps_per_trial and trial.eval_every == trial.log_every
    assert config.train.model.num_layers == 2  # the recipe's own config is untouched
