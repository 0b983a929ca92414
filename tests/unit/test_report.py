"""The run report: rendered from a manifest, opened in a real headless Chromium."""

from __future__ import annotations

import json

from cluster.report import write_report
from pipelines.runs import RunDir, StageResult
from tests.browser import render


def _figure(path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.plot([0, 1, 2], [3.0, 2.0, 1.5])
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def _run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "report-run")
    data = run.begin("data")
    (data / "stats.json").write_text(
        json.dumps(
            {
                "funnel": [
                    {"step": "read", "documents": 10, "kept": 9},
                    {"step": "exact_dedup", "documents": 10, "kept": 7},
                ],
                "drops_by_reason": {"<script>alert(1)</script>": 1, "exact_dedup: duplicate": 2},
                "steps": {"02-exact_dedup": {"duplicate_clusters": 2, "dropped": 2}},
            }
        )
    )
    _figure(run.root / "report" / "data_funnel.png", "funnel")
    _figure(run.root / "report" / "train_loss.png", "loss")
    run.complete(
        "data",
        "k-data",
        StageResult(
            inputs={"sources": "src-hash"},
            outputs={"stats": str(data / "stats.json"), "train": "/elsewhere/not-in-run"},
            metrics={"documents_in": 10, "documents_out": 7},
        ),
    )
    run.begin("train")
    run.complete(
        "train",
        "k-train",
        StageResult(outputs={"model": str(run.stage_dir("train"))}, metrics={"val_loss": 1.2345678}),
        config_hash="c-train",
        upstream={"data": "k-data"},
    )
    run.begin("serve")
    run.complete(
        "serve",
        "k-serve",
        StageResult(outputs={"endpoint": "https://127.0.0.1:8000/v1", "models": ["loom-tiny", "loom-tiny-w8a8"]}),
        upstream={"train": "k-train"},
    )
    return run


def test_report_lists_lineage_stages_and_artifacts_escaped(tmp_path):
    run = _run(tmp_path)
    page = write_report(run)
    html = page.read_text()

    assert page == run.root / "report" / "index.html"
    for identity in ("src-hash", "k-data", "k-train (from data k-data)", "k-serve (from train k-train)"):
        assert identity in html
    assert "loom-tiny, loom-tiny-w8a8" in html  # the served model ids end the lineage
    # Artifacts inside the run link relative to the report; others are shown, not linked.
    assert 'href="../data/stats.json"' in html and 'href="../manifest.json"' in html
    assert "/elsewhere/not-in-run" in html and 'href="/elsewhere' not in html
    # Recipe and data strings are escaped, never markup.
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "1.235" in html  # floats to 4 significant digits


def test_report_renders_in_chromium_with_every_figure(tmp_path):
    run = _run(tmp_path)
    page = render(write_report(run), tmp_path / "report.png")

    assert page.body_attribute("images") == "2" and page.body_attribute("broken-images") == "0", page.dom[-2000:]
    assert page.screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and page.screenshot.stat().st_size > 10_000

    # The same check sees a figure that is gone.
    (run.root / "report" / "train_loss.png").unlink()
    broken = render(run.root / "report" / "index.html", tmp_path / "broken.png")
    assert broken.body_attribute("images") == "2" and broken.body_attribute("broken-images") == "1"
