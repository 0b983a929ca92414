"""The compression sweep's candidates as plain data: which meet the quality bound, which are on the
Pareto front (Optuna's own non-domination, over an in-memory study), and the plot people look at."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The objectives and their directions, in the order Optuna's study holds them.
OBJECTIVES: dict[str, str] = {"perplexity": "min", "weight_bytes": "min", "tokens_per_s": "max"}


@dataclass
class Candidate:
    """One measured model: the base, or a trial's compressed variant."""

    name: str
    recipe: dict[str, Any]
    engine: str  # where it was measured: "vllm", or "transformers" where vLLM cannot load it here
    servable: bool  # whether the serving engine on this hardware loads it
    perplexity: float
    weight_bytes: int
    tokens_per_s: float
    p50_latency_ms: float
    trial_id: str | None = None  # None for the base model
    feasible: bool = True
    infeasible_reason: str | None = None
    on_front: bool = False
    ratios: dict[str, float] = field(default_factory=dict)

    def objectives(self) -> list[float]:
        """The objectives as ratios to the base measured in the same engine (``judge`` sets them): tokens/s in
        transformers and in vLLM are not comparable, a candidate's gain over its own engine's base is."""
        if set(self.ratios) != set(OBJECTIVES):
            raise ValueError(f"candidate {self.name} has not been judged against a base in {self.engine}")
        return [float(self.ratios[name]) for name in OBJECTIVES]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(candidates: list[Candidate], bases: dict[str, Candidate], max_perplexity_increase: float) -> None:
    """Set each candidate's ratios to the base measured in the same engine, and whether it meets the bound."""
    for candidate in candidates:
        base = bases[candidate.engine]
        candidate.ratios = {
            "perplexity": candidate.perplexity / base.perplexity,
            "weight_bytes": candidate.weight_bytes / base.weight_bytes,
            "tokens_per_s": candidate.tokens_per_s / base.tokens_per_s,
        }
        bound = base.perplexity * (1 + max_perplexity_increase)
        candidate.feasible = candidate.perplexity <= bound
        candidate.infeasible_reason = (
            None
            if candidate.feasible
            else f"perplexity {candidate.perplexity:.4g} above the bound {bound:.4g} "
            f"(base {base.perplexity:.4g} in {candidate.engine} x {1 + max_perplexity_increase:g})"
        )


def pareto_front(candidates: list[Candidate]) -> list[Candidate]:
    """The feasible candidates no other feasible candidate dominates on every objective (each as a ratio to the
    base measured in its own engine); each is marked."""
    import optuna

    feasible = [c for c in candidates if c.feasible]
    if not feasible:
        return []
    study = optuna.create_study(directions=[("minimize" if d == "min" else "maximize") for d in OBJECTIVES.values()])
    study.add_trials(
        [
            optuna.trial.create_trial(values=c.objectives(), params={}, distributions={}, user_attrs={"index": i})
            for i, c in enumerate(feasible)
        ]
    )
    front = [feasible[trial.user_attrs["index"]] for trial in study.best_trials]
    for candidate in front:
        candidate.on_front = True
    return sorted(front, key=lambda c: c.weight_bytes)


def plot_front(candidates: list[Candidate], path: Path) -> Path:
    """Perplexity against weight bytes and against tokens/s, each as a ratio to the base measured in the
    candidate's own engine (what the front compares): every candidate, the front in red, the base a star at 1;
    circles were measured in vLLM, triangles in transformers (not servable here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for axis, (x, label) in zip(
        axes,
        (("weight_bytes", "weight bytes / the base's"), ("tokens_per_s", "tokens/s / the base's (same engine)")),
        strict=True,
    ):
        for candidate in candidates:
            style = {"marker": "*" if candidate.trial_id is None else ("o" if candidate.engine == "vllm" else "^")}
            style["s"] = 220 if candidate.trial_id is None else 60
            style["color"] = "tab:red" if candidate.on_front else ("tab:gray" if candidate.feasible else "lightgray")
            point = (candidate.ratios[x], candidate.ratios["perplexity"])
            axis.scatter(*point, edgecolors="black", **style)
            if candidate.on_front or candidate.trial_id is None:
                axis.annotate(candidate.name, point, fontsize=7, xytext=(4, 4), textcoords="offset points")
        axis.set_xlabel(label)
        axis.set_ylabel("held-out perplexity / the base's")
        axis.grid(alpha=0.3)
    axes[0].set_title("perplexity vs size (red: Pareto front, star: base)")
    axes[1].set_title("perplexity vs speed (circle: vLLM, triangle: transformers)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
