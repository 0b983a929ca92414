"""The compression families on a small random Llama (no Ray, no training): each writes a directory
transformers loads, with finite held-out perplexity and the size it claims; and the front's selection."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")

HIDDEN, LAYERS, HEADS, INTERMEDIATE, VOCAB = 64, 2, 2, 256, 256


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HIDDEN // HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("base")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rows():
    generator = random.Random(0)
    return [[generator.randrange(VOCAB) for _ in range(32)] for _ in range(6)]


def _perplexity(model_dir, rows) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    with torch.no_grad():
        losses = [float(model(torch.tensor([r]), labels=torch.tensor([r])).loss) for r in rows]
    return math.exp(sum(losses) / len(losses))


def _linear_parameters(hidden=HIDDEN, heads=HEADS, intermediate=INTERMEDIATE, head_dim=HIDDEN // HEADS) -> int:
    attention = 4 * hidden * heads * head_dim  # q, k, v, o (as many key-value heads as heads)
    return LAYERS * (attention + 3 * hidden * intermediate)


def _other_parameters() -> int:
    return VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN  # tied embedding, the norms


@pytest.mark.parametrize(
    ("family", "bytes_per_linear_weight"),
    # nf4: half a byte a weight plus one float32 absmax per block of 64.
    [("bnb_int8", 1), ("bnb_nf4", 0.5 + 4 / 64), ("w8a8", 1)],
)
def test_quantized_weights_shrink_as_claimed_and_stay_usable(base, rows, tmp_path, family, bytes_per_linear_weight):
    from pipelines.compress.files import weight_bytes
    from pipelines.compress.quantize import bnb_quantize, w8a8_int8

    out = tmp_path / family
    if family == "w8a8":
        w8a8_int8(base, out)
    else:
        bnb_quantize(base, out, 8 if family == "bnb_int8" else 4)
    linear, other = _linear_parameters(), _other_parameters()
    assert weight_bytes(base) == pytest.approx(4 * (linear + other), rel=0.01)
    # Linear weights at their new width, everything else as it was; scales and headers add a few percent.
    assert weight_bytes(out) == pytest.approx(bytes_per_linear_weight * linear + 4 * other, rel=0.1)
    base_ppl, quantized_ppl = _perplexity(base, rows), _perplexity(out, rows)
    assert math.isfinite(quantized_ppl)
    assert quantized_ppl == pytest.approx(base_ppl, rel=0.05)  # a random model's outputs barely move


def test_pruned_shape_rounds_to_what_transformers_and_vllm_accept():
    from types import SimpleNamespace

    from pipelines.compress.prune import pruned_shape

    config = SimpleNamespace(num_attention_heads=12, num_key_value_heads=12, hidden_size=768, intermediate_size=3072)
    assert pruned_shape(config, 0.5, 0.5) == (6, 1536)
    assert pruned_shape(config, 0.42, 0.3) == (6, 928)  # 5 groups do not divide 768; 921.6 -> 58 x 16
    assert pruned_shape(config, 0.01, 0.001) == (1, 16)
    gqa = SimpleNamespace(num_attention_heads=8, num_key_value_heads=2, hidden_size=512, intermediate_size=1024)
    assert pruned_shape(gqa, 0.5, 1.0) == (1, 1024)


def test_pruning_removes_the_least_important_heads_and_channels(base, rows, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from pipelines.compress.files import weight_bytes
    from pipelines.compress.prune import prune_structured

    # Silence head 1 in layer 0 and head 0 in layer 1 (their o_proj columns), and MLP channels 0-127 in
    # every layer: pruning by importance must drop exactly those, each layer choosing its own.
    planted = tmp_path / "planted"
    planted.mkdir()
    for name in ("config.json", "generation_config.json"):
        (planted / name).write_bytes((base / name).read_bytes())
    weights = load_file(base / "model.safetensors")
    head_dim = HIDDEN // HEADS
    weights["model.layers.0.self_attn.o_proj.weight"][:, head_dim:] = 0
    weights["model.layers.1.self_attn.o_proj.weight"][:, :head_dim] = 0
    for layer in range(LAYERS):
        weights[f"model.layers.{layer}.mlp.down_proj.weight"][:, :128] = 0
    save_file(weights, planted / "model.safetensors", metadata={"format": "pt"})

    out = prune_structured(planted, tmp_path / "pruned", heads_kept=0.5, mlp_kept=0.5, calibration=rows[:3])
    config = AutoConfig.from_pretrained(out)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (1, 1, 128)
    assert config.head_dim == head_dim
    kept = load_file(out / "model.safetensors")
    assert torch.equal(
        kept["model.layers.0.self_attn.q_proj.weight"], weights["model.layers.0.self_attn.q_proj.weight"][:head_dim]
    )
    assert torch.equal(
        kept["model.layers.1.self_attn.k_proj.weight"], weights["model.layers.1.self_attn.k_proj.weight"][head_dim:]
    )
    assert torch.equal(kept["model.layers.1.mlp.up_proj.weight"], weights["model.layers.1.mlp.up_proj.weight"][128:])
    linear = _linear_parameters(heads=1, intermediate=128, head_dim=head_dim)
    assert weight_bytes(out) == pytest.approx(4 * (linear + _other_parameters()), rel=0.01)
    # The silenced parts contributed nothing, so the pruned model computes what the planted one did.
    assert _perplexity(out, rows) == pytest.approx(_perplexity(planted, rows), rel=1e-4)


def _candidate(name, ppl, size, speed, engine="vllm"):
    from pipelines.compress.front import Candidate

    return Candidate(name, {}, engine, engine == "vllm", ppl, size, speed, 1.0, trial_id=name)


def _dominates(a, b) -> bool:
    a, b = a.ratios, b.ratios
    at_least = (
        a["perplexity"] <= b["perplexity"]
        and a["weight_bytes"] <= b["weight_bytes"]
        and a["tokens_per_s"] >= b["tokens_per_s"]
    )
    better = (
        a["perplexity"] < b["perplexity"]
        or a["weight_bytes"] < b["weight_bytes"]
        or a["tokens_per_s"] > b["tokens_per_s"]
    )
    return at_least and better


def test_front_is_exactly_the_feasible_non_dominated_candidates():
    from pipelines.compress.front import judge, pareto_front

    generator = random.Random(1)
    candidates = [
        _candidate(f"c{i}", generator.uniform(10, 12), generator.randrange(100, 400), generator.uniform(50, 150))
        for i in range(40)
    ]
    bases = {"vllm": _candidate("base", 10.0, 400, 100)}
    judge(candidates, bases, max_perplexity_increase=0.15)
    assert any(not c.feasible for c in candidates) and any(c.feasible for c in candidates)
    front = pareto_front(candidates)
    feasible = [c for c in candidates if c.feasible]
    for candidate in feasible:
        dominated = any(_dominates(other, candidate) for other in feasible)
        assert candidate.on_front == (not dominated), candidate
    assert {c.name for c in front} == {c.name for c in candidates if c.on_front}
    assert all(c.feasible for c in front)
    loser = next(c for c in candidates if not c.feasible)
    assert "above the bound" in loser.infeasible_reason
    assert candidates[0].ratios["weight_bytes"] == candidates[0].weight_bytes / 400


def test_the_front_compares_each_candidate_with_the_base_of_its_own_engine():
    """A bitsandbytes variant measured in transformers (slow there) is not dominated by a vLLM one for its raw
    tokens/s: what counts is its speed over the base measured in transformers."""
    from pipelines.compress.front import judge, pareto_front

    bases = {"vllm": _candidate("base", 10.0, 400, 100.0), "transformers": _candidate("base", 10.0, 400, 20.0)}
    vllm = _candidate("w8a8", 10.1, 150, 90.0)  # 0.9x its base's speed
    bnb = _candidate("bnb-int8", 10.1, 150, 30.0, engine="transformers")  # 1.5x its base's speed
    judge([vllm, bnb], bases, max_perplexity_increase=0.05)
    assert [c.name for c in pareto_front([vllm, bnb])] == ["bnb-int8"]  # raw tokens/s would have kept w8a8 alone
    with pytest.raises(ValueError, match="not been judged"):
        pareto_front([_candidate("unjudged", 10.0, 100, 10.0)])


def test_plot_marks_every_candidate(tmp_path):
    from pipelines.compress.front import judge, pareto_front, plot_front

    candidates = [_candidate("a", 10, 100, 50), _candidate("b", 11, 50, 60, engine="transformers")]
    judge(candidates, {"vllm": _candidate("base", 10, 200, 50), "transformers": _candidate("base", 10, 200, 20)}, 0.2)
    pareto_front(candidates)
    path = plot_front(candidates, tmp_path / "pareto.png")
    assert path.stat().st_size > 10_000


def test_try_first_points_must_lie_in_the_space():
    from cluster.recipe import ConfigError, load_config
    from tests.conftest import TINY

    with pytest.raises(ConfigError) as error:
        load_config(
            TINY,
            [
                "compress.families=[prune, w8a8]",
                "compress.try_first=[{family: prune, heads_kept: 0.1, mlp_kept: 0.5, then_quantize: none},"
                "{family: bnb_nf4}]",
            ],
        )
    message = str(error.value)
    assert "compress.try_first.0.heads_kept: 0.1 is outside prune.heads_kept [0.5, 1.0]" in message
    assert "compress.try_first.1.family: bnb_nf4 is not among families" in message


def variant_record(name, family, ppl_ratio=1.0, size=100, speed=10.0, base_model="/run/train/model", **extra):
    """A compress stage's record of a kept variant, as ``compression.json`` holds it."""
    from pipelines.artifacts import VariantLineage, VariantRecord

    return VariantRecord(
        name=name,
        recipe={"family": family},
        engine="vllm",
        servable=True,
        perplexity=10.0 * ppl_ratio,
        weight_bytes=size,
        tokens_per_s=speed,
        p50_latency_ms=5.0,
        ratios={"perplexity": ppl_ratio},
        lineage=VariantLineage(base_model=base_model, base_model_hash="0" * 16, val_shards_hash="1" * 16),
        path=f"/run/compress/variants/{name}",
        **extra,
    )


def _front():
    return {
        "bnb-nf4": variant_record("bnb-nf4", "bnb_nf4", 1.001, 40, 50),
        "w8a8-int8": variant_record("w8a8-int8", "w8a8", 1.004, 60, 90),
        "pruned-g1of2-m128of256": variant_record("pruned-g1of2-m128of256", "prune", 1.015, 70, 150),
        "pruned-g1of2-m64of256-w8a8": variant_record("pruned-g1of2-m64of256-w8a8", "prune", 1.3, 20, 200),
    }


def test_a_variant_is_chosen_by_name_or_rule_among_what_vllm_here_serves():
    from pipelines.compress.variants import VariantUnavailableError, choose

    front = _front()
    assert choose(front, "cpu", rule="smallest", max_perplexity_increase=0.02) == "w8a8-int8"  # bnb: not on CPU
    assert choose(front, "gpu", rule="smallest", max_perplexity_increase=0.02) == "bnb-nf4"
    assert choose(front, "cpu", rule="fastest", max_perplexity_increase=0.02) == "pruned-g1of2-m128of256"
    assert choose(front, "cpu", rule="smallest", max_perplexity_increase=0.5) == "pruned-g1of2-m64of256-w8a8"
    assert choose(front, "cpu", name="w8a8-int8") == "w8a8-int8"
    with pytest.raises(VariantUnavailableError, match="cannot be served by vLLM on cpu"):
        choose(front, "cpu", name="bnb-nf4")
    with pytest.raises(VariantUnavailableError, match="kept no variant 'bnb-int8'"):
        choose(front, "gpu", name="bnb-int8")
    with pytest.raises(VariantUnavailableError, match=r"within 0\.1% .* w8a8-int8 \(1\.004x\)"):
        choose(front, "cpu", rule="smallest", max_perplexity_increase=0.001)


def test_serving_a_variant_vllm_cannot_load_here_is_refused_at_validation():
    from cluster.recipe import ConfigError, load_config
    from tests.conftest import TINY

    with pytest.raises(ConfigError) as error:
        load_config(
            TINY,
            [
                "serve.models={a: {variant: {name: bnb-nf4}}, b: {variant: {name: nonsense}},"
                " c: {variant: {rule: smallest}, source: /somewhere}}"
            ],
        )
    message = str(error.value)
    assert "serve.models.a.variant.name: bnb-nf4 is a bitsandbytes variant, which vLLM on cpu cannot load" in message
    assert "serve.models.b.variant: 'nonsense' is no variant name" in message
    assert "serve.models.c.variant: serves the run's compressed variant: leave source unset" in message
    with pytest.raises(ConfigError, match="compress.enabled is false"):
        load_config(TINY, ["compress.enabled=false", "serve.models={a: {variant: {name: w8a8-int8}}}"])
    served = load_config(TINY, ["serve.models={a: {accelerator: gpu, variant: {name: bnb-nf4}}}"])
    assert served.serve.models["a"].variant.name == "bnb-nf4"  # vLLM on GPU loads bitsandbytes


def _compress_dir(tmp_path, draft):
    import json

    from pipelines.artifacts import CompressionFront

    front = CompressionFront(tmp_path)
    for name, family in (("w8a8-int8", "w8a8"), ("distilled-l1-h64", "distill"), ("distilled-l1-h32", "distill")):
        front.variant_dir(name).mkdir(parents=True)
        front.write_variant(variant_record(name, family))
    front.pareto.write_text(json.dumps({"variants": ["w8a8-int8"], "draft": draft}))
    return front


def test_the_draft_is_the_measured_student_or_a_kept_distilled_variant_by_name(tmp_path):
    from pipelines.compress.variants import VariantUnavailableError, choose_draft

    measured = _compress_dir(tmp_path / "measured", {"variant": "distilled-l1-h64"})
    assert choose_draft(measured).name == "distilled-l1-h64"
    assert choose_draft(measured, "distilled-l1-h32").name == "distilled-l1-h32"
    assert set(measured.kept()) == {"w8a8-int8"}
    with pytest.raises(VariantUnavailableError, match="no distilled variant 'distilled-l2-h64'.*distilled-l1-h32"):
        choose_draft(measured, "distilled-l2-h64")
    with pytest.raises(VariantUnavailableError, match="no distilled variant 'w8a8-int8'"):
        choose_draft(measured, "w8a8-int8")
    with pytest.raises(VariantUnavailableError, match="measured no draft"):
        choose_draft(_compress_dir(tmp_path / "none", None))


def test_the_draft_measured_is_the_student_closest_to_the_base():
    from pipelines.compress.front import Candidate
    from pipelines.compress.stage import best_student

    def candidate(name, family, perplexity):
        return Candidate(name, {"family": family}, "vllm", True, perplexity, 100, 10.0, 5.0, trial_id=name)

    assert best_student([candidate("w8a8-int8", "w8a8", 1.0)]) is None
    students = [candidate("distilled-l1-h32", "distill", 9.0), candidate("distilled-l1-h64", "distill", 7.0)]
    assert best_student([candidate("w8a8-int8", "w8a8", 1.0), *students]).name == "distilled-l1-h64"


def test_speculative_drafts_must_be_distilled_students_the_recipe_makes():
    from cluster.recipe import ConfigError, load_config
    from tests.conftest import TINY

    with pytest.raises(ConfigError, match=r"speculative.draft: .*'w8a8-int8' is no distilled variant"):
        load_config(TINY, ["serve.models.loom-tiny.engine.speculative={draft: w8a8-int8}"])
    with pytest.raises(ConfigError, match="speculative: drafts with a distilled student, but the compress stage"):
        load_config(
            TINY, ["compress.families=[w8a8]", "compress.try_first=[]", "serve.models.loom-tiny.engine.speculative={}"]
        )
    with pytest.raises(ConfigError, match="compress.draft.enabled is false"):
        load_config(TINY, ["compress.draft.enabled=false", "serve.models.loom-tiny.engine.speculative={}"])
    drafted = load_config(TINY, ["serve.models.loom-tiny.engine.speculative={num_speculative_tokens: 2}"])
    assert drafted.serve.models["loom-tiny"].engine.speculative.num_speculative_tokens == 2


def test_distillation_loss_is_the_teachers_kl_blended_with_the_data_loss():
    from pipelines.compress.distill import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    hard = torch.tensor(3.0)
    assert float(distillation_loss(student, teacher, labels, hard, 2.0, alpha=0.0)) == pytest.approx(3.0)
    assert float(distillation_loss(teacher, teacher, labels, hard, 2.0, alpha=1.0)) == pytest.approx(0.0, abs=1e-6)
    # By hand: T^2 x the mean over target positions of KL(teacher_T || student_T).
    t = 3.0
    p = torch.softmax(teacher[:, :-1] / t, -1)
    kl = (p * (p.log() - torch.log_softmax(student[:, :-1] / t, -1))).sum(-1)
    expected = 0.25 * t**2 * kl.mean() + 0.75 * 3.0
    assert float(distillation_loss(student, teacher, labels, hard, t, alpha=0.25)) == pytest.approx(
        float(expected), rel=1e-5
    )
    # Positions whose next token is not a target (-100, e.g. an SFT prompt) are left out of the KL term.
    masked = labels.clone()
    masked[:, 3:] = -100
    kept = kl[:, :2].mean()
    assert float(distillation_loss(student, teacher, masked, hard, t, alpha=1.0)) == pytest.approx(
        float(t**2 * kept), rel=1e-5
    )


def test_student_shape_keeps_the_head_size():
    from types import SimpleNamespace

    from pipelines.compress.distill import student_shape

    teacher = SimpleNamespace(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, head_dim=64
    )
    assert student_shape(teacher, 0.5, 0.5) == {
        "num_layers": 6,
        "hidden_size": 384,
        "num_heads": 6,
        "num_kv_heads": 6,
        "intermediate_size": 1536,
    }
    tiny = SimpleNamespace(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=2, intermediate_size=256, head_dim=32
    )
    assert student_shape(tiny, 0.1, 0.1) == {
        "num_layers": 1,
        "hidden_size": 32,
        "num_heads": 1,
        "num_kv_heads": 1,
        "intermediate_size": 128,
    }
