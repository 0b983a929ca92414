"""The run report: ``<run>/report/index.html``, one page per run.

It is rebuilt from the manifest after every stage, so a half-run chain has a report of what it
did: each stage's summary and figures, the lineage from raw sources to the served model ids,
and links to the artifacts. The page is static HTML next to the figures the stages plot into
``<run>/report/``; it opens from disk, with no server.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.stages import STAGE_NAMES
from pipelines.artifacts import DataOutputs, EvalResults, EvalTaskInfo, TaskScore
from pipelines.runs import RunDir

#: The report's sections, in chain order.
STAGE_ORDER = STAGE_NAMES

TEMPLATE = Path(__file__).with_name("templates") / "report.html"


@dataclass
class Link:
    label: str
    value: str
    #: Relative to the report folder when the artifact lies inside the run directory.
    href: str | None = None


@dataclass
class StageSection:
    name: str
    key: str
    config_hash: str
    upstream: dict[str, str]
    completed_at: str
    inputs: dict[str, str]
    outputs: list[Link]
    metrics: list[tuple[str, str]]
    figures: list[str]
    tables: dict[str, list[tuple[str, str]]] = field(default_factory=dict)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _link(run: RunDir, report_dir: Path, label: str, value: Any) -> Link:
    if isinstance(value, list):
        return Link(label, ", ".join(str(v) for v in value))
    text = "" if value is None else str(value)
    path = Path(text)
    if text and path.is_absolute() and path.exists() and path.resolve().is_relative_to(run.root):
        return Link(label, os.path.relpath(path, run.root), os.path.relpath(path, report_dir))
    return Link(label, text)


def _figures(report_dir: Path, stage: str) -> list[str]:
    """The figures a stage plots into ``<run>/report/`` are named ``<stage>_*.png``; others are listed apart."""
    return sorted(p.name for p in report_dir.glob(f"{stage}_*.png"))


def _data_tables(run: RunDir) -> dict[str, list[tuple[str, str]]]:
    """Rejects by reason and the dedup steps' figures, from the data stage's ``stats.json``."""
    stats_path = DataOutputs.at(run).stats
    if not stats_path.is_file():
        return {}
    stats = json.loads(stats_path.read_text())
    tables = {
        "Funnel (documents kept after each step)": [
            (row["step"], f"{row['kept']:,} of {row['documents']:,}") for row in stats.get("funnel", [])
        ],
        "Rejects by reason": [(reason, f"{count:,}") for reason, count in stats.get("drops_by_reason", {}).items()],
    }
    dedup = {
        step: figures
        for step, figures in stats.get("steps", {}).items()
        if "dedup" in step and isinstance(figures, dict)
    }
    if dedup:
        tables["Deduplication"] = [
            (f"{step}: {name}", _show(v)) for step, figures in dedup.items() for name, v in figures.items()
        ]
    return {title: rows for title, rows in tables.items() if rows}


def _eval_tables(run: RunDir) -> dict[str, list[tuple[str, str]]]:
    """Each task's headline metric for the base model and every variant, with the harness's standard error."""
    results = EvalResults.at(run)
    if not results.summary_path.is_file():
        return {}
    summary = results.summary()
    rows = []
    for task, info in summary.tasks.items():
        for model in summary.models:
            found = summary.headline(task, model)
            if found is not None:
                rows.append((f"{task} · {model}", _headline(info, found)))
    skipped = [(model, scores.not_scored) for model, scores in summary.models.items() if scores.not_scored]
    tables = {"Scores (lm-evaluation-harness, n = task rows)": rows}
    if skipped:
        tables["Not scored"] = skipped
    # What users of an endpoint get, as `loom eval --endpoint` scored it.
    tables["Scored through an endpoint (loom eval --endpoint)"] = [
        (f"{task} · {scored.model} at {scored.endpoint}", _headline(info, scored.headline(task)))
        for scored in results.endpoint_scores()
        for task, info in scored.tasks.items()
        if scored.headline(task) is not None
    ]
    return {title: table for title, table in tables.items() if table}


def _headline(info: EvalTaskInfo, found: TaskScore) -> str:
    error = f" ± {found.stderr:.3g}" if found.stderr is not None else ""
    return f"{info.headline} {found.value:.4g}{error} ({info.better} is better)"


#: Tables a stage's section shows besides its metrics, read from its own files.
TABLES = {"data": _data_tables, "eval": _eval_tables}


def _section(run: RunDir, report_dir: Path, name: str, record: dict[str, Any]) -> StageSection:
    return StageSection(
        name=name,
        key=record.get("key", ""),
        config_hash=record.get("config_hash", ""),
        upstream=record.get("upstream", {}),
        completed_at=record.get("completed_at", ""),
        inputs={k: _show(v) for k, v in record.get("inputs", {}).items()},
        outputs=[_link(run, report_dir, k, v) for k, v in record.get("outputs", {}).items() if v not in (None, "")],
        metrics=[(k, _show(v)) for k, v in record.get("metrics", {}).items()],
        figures=_figures(report_dir, name),
        tables=TABLES[name](run) if name in TABLES else {},
    )


def _lineage(stages: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    """Raw sources -> each stage's key -> the served model ids, as (what, identity) rows."""
    rows: list[tuple[str, str]] = []
    if "data" in stages:
        rows.append(("raw sources", stages["data"].get("inputs", {}).get("sources", "")))
    for name in STAGE_ORDER:
        if name in stages:
            upstream = ", ".join(f"{k} {v}" for k, v in stages[name].get("upstream", {}).items())
            rows.append((name, stages[name]["key"] + (f" (from {upstream})" if upstream else "")))
    if "serve" in stages:
        models = stages["serve"].get("outputs", {}).get("models", [])
        rows.append(("served model ids", ", ".join(models)))
    return rows


def write_report(run: RunDir) -> Path:
    """Render ``<run>/report/index.html`` from the manifest and the figures beside it."""
    import jinja2

    report_dir = run.root / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    stages = run.manifest()["stages"]
    sections = [_section(run, report_dir, name, stages[name]) for name in STAGE_ORDER if name in stages]
    placed = {figure for section in sections for figure in section.figures}
    others = sorted(p.name for p in report_dir.glob("*.png") if p.name not in placed)
    packages = next((stages[n]["packages"] for n in reversed(STAGE_ORDER) if n in stages), {})
    # autoescape: recipe names, reasons and demo text are user data.
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = environment.from_string(TEMPLATE.read_text()).render(
        run_name=run.root.name,
        run_dir=str(run.root),
        generated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        lineage=_lineage(stages),
        sections=sections,
        other_figures=others,
        packages=sorted(packages.items()),
    )
    path = report_dir / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html)
    os.replace(tmp, path)
    return path
