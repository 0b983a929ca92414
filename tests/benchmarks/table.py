"""The performance tables, generated from the committed result files ``docs/results/*.json``.

``python -m tests.benchmarks.table`` rewrites the text between ``<!-- loom:bench-table:start -->`` and
``<!-- loom:bench-table:end -->`` in ``docs/src/benchmarks.md`` (every comparison of every benchmark)
and in ``README.md`` (the headline ratios); nothing outside the markers is touched. ``--check`` only
says whether both are up to date. A benchmark without a result file is not in either table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "docs" / "results"
README = REPO_ROOT / "README.md"
DOCS_PAGE = REPO_ROOT / "docs" / "src" / "benchmarks.md"
START, END = "<!-- loom:bench-table:start -->", "<!-- loom:bench-table:end -->"
MIN_RUNS = 3
#: The README's table: (result file, comparison name), in this order; those without a file are left out.
HEADLINES = [
    ("dedup", "documents/s per core"),
    ("dedup_defaults", "F1 at the threshold, new defaults vs old"),
    ("dedup_scale", "documents/s per core vs datatrove"),
    ("data_scale", "documents/s per core, 1,000,000 vs 100,000 documents"),
    ("data_scale", "peak machine memory at 1,000,000 documents (GiB)"),
    ("data_scale", "ETA error at halfway, 1,000,000 documents"),
    ("tokenize_pack", "tokens/s, stdlib + packages, vs encode_batch"),
    ("train_throughput", "tokens/s, 1 worker vs plain torch"),
    ("parquet_read", "first-batch seconds"),
    ("serve_load", "output tokens/s, Ray Serve vs vLLM server"),
    ("serve_paths", "output tokens/s, Loom vs bare vLLM"),
    ("serve_fairness", "light key's p99 under a flood / alone, fair scheduling"),
    ("serve_cold_start", "cold start"),
    ("tune_asha", "trial steps, TPE + ASHA / random + FIFO"),
    ("recovery", "seconds to progress after a kill"),
    ("recovery", "sequences lost or repeated after a kill"),
    ("node_loss_data", "stage seconds, a node lost vs undisturbed"),
    ("node_loss_training", "seconds to progress after a node's loss"),
    ("node_loss_elastic", "seconds to progress on the survivors"),
    ("node_loss", "node lost: seconds to the replica running again"),
    ("node_loss", "node lost: requests failed, %"),
    ("node_loss", "head restart: requests failed, %"),
    ("eval_cost", "eval stage seconds"),
]
REQUIRED = (
    "benchmark",
    "stage",
    "measure",
    "command",
    "date",
    "runs",
    "inputs",
    "machine",
    "quantities",
    "comparisons",
)
REQUIRED_MACHINE = ("platform", "cpu", "cores", "memory_gib", "python", "packages")
REQUIRED_SPREAD = ("values", "median", "min", "max")
REQUIRED_COMPARISON = ("name", "measure", "baseline", "contender", "kind", "better", *REQUIRED_SPREAD)


class ResultError(ValueError):
    """A result file that cannot go into the table."""


class MarkerError(ValueError):
    """A page without the markers the table goes between."""


def _missing(mapping: Any, fields: tuple[str, ...], where: str, source: str) -> None:
    if not isinstance(mapping, dict):
        raise ResultError(f"{source}: {where} is not an object")
    absent = [f for f in fields if f not in mapping]
    if absent:
        raise ResultError(f"{source}: {where} is missing required field(s) {', '.join(absent)}")


def validate(result: dict[str, Any], source: str) -> dict[str, Any]:
    """``result`` unchanged, or a :class:`ResultError` naming the file and the first field that is wrong."""
    _missing(result, REQUIRED, "the result", source)
    _missing(result["machine"], REQUIRED_MACHINE, "machine", source)
    if not isinstance(result["runs"], int) or result["runs"] < MIN_RUNS:
        raise ResultError(f"{source}: runs is {result['runs']!r}; a median and spread need at least {MIN_RUNS}")
    if not result["quantities"]:
        raise ResultError(f"{source}: quantities is empty: nothing was measured")
    for key, values in result["quantities"].items():
        _missing(values, REQUIRED_SPREAD, f"quantity {key!r}", source)
        if len(values["values"]) < MIN_RUNS:
            raise ResultError(f"{source}: quantity {key!r} has {len(values['values'])} values, fewer than {MIN_RUNS}")
    if not isinstance(result["comparisons"], list) or not result["comparisons"]:
        raise ResultError(f"{source}: comparisons is empty: there is no headline figure")
    for index, compared in enumerate(result["comparisons"]):
        _missing(compared, REQUIRED_COMPARISON, f"comparison {index}", source)
        for role in ("baseline", "contender"):
            if compared[role] is not None and compared[role] not in result["quantities"]:
                raise ResultError(f"{source}: comparison {compared['name']!r}: {role} {compared[role]!r} not measured")
        if compared["kind"] not in ("ratio", "difference", "value"):
            raise ResultError(f"{source}: comparison {compared['name']!r}: unknown kind {compared['kind']!r}")
    return result


def load_results(directory: Path = RESULTS_DIR) -> list[dict[str, Any]]:
    """Every result file, checked, in file-name order."""
    results = []
    for path in sorted(directory.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ResultError(f"{path}: not JSON ({error})") from error
        result = validate(result, str(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path))
        result["_file"] = path.name
        results.append(result)
    return results


def number(value: float) -> str:
    """Three significant figures, thousands separated, no exponent."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def compared_cell(compared: dict[str, Any]) -> str:
    low, high = compared["min"], compared["max"]
    if compared["kind"] == "ratio":
        return f"{number(compared['median'])}× [{number(low)}–{number(high)}]"
    if compared["kind"] == "difference":
        return f"{compared['median']:+.3g} [{low:+.3g} to {high:+.3g}]"
    return f"{number(compared['median'])} [{number(low)}–{number(high)}]"


def quantity_cell(result: dict[str, Any], key: str | None) -> str:
    if key is None:
        return "—"
    label = key.rsplit(": ", 1)[
        -1
    ]  # "stdlib: encode_batch tokens/s" -> "encode_batch tokens/s": the measure names the corpus
    return f"{label}: {number(result['quantities'][key]['median'])}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def render_full(results: list[dict[str, Any]]) -> str:
    """Every comparison of every benchmark, the headline of each first. The result file is named, not
    linked: it lies outside the docs site's ``docs_dir``, and the strict build refuses such links."""
    lines = [
        _row(["stage", "measure", "baseline (median)", "Loom (median)", "Loom vs baseline, median [min–max]",
              "runs", "date", "result"]),
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for result in results:
        for compared in result["comparisons"]:
            lines.append(
                _row(
                    [
                        result["stage"],
                        f"{compared['measure']} ({compared['better']} is better)",
                        quantity_cell(result, compared["baseline"]),
                        quantity_cell(result, compared["contender"]),
                        compared_cell(compared),
                        f"{result['runs']} {result.get('runs_over', 'runs')}",
                        result["date"],
                        f"`docs/results/{result['_file']}`",
                    ]
                )
            )
    return "\n".join(lines)


def render_headline(results: list[dict[str, Any]], link: str = "docs/src/benchmarks.md") -> str:
    """The headline ratios, each linking to the full table."""
    by_name = {result["benchmark"]: result for result in results}
    lines = [_row(["stage", "measure", "Loom vs baseline, median [min–max]", "runs"]), "|---|---|---|---|"]
    for benchmark, name in HEADLINES:
        result = by_name.get(benchmark)
        compared = next((c for c in result["comparisons"] if c["name"] == name), None) if result else None
        if compared is None:
            continue
        lines.append(
            _row(
                [
                    result["stage"],
                    f"[{compared['measure']}]({link}) ({compared['better']} is better)",
                    compared_cell(compared),
                    f"{result['runs']} {result.get('runs_over', 'runs')}",
                ]
            )
        )
    return "\n".join(lines)


def between_markers(text: str, path: Path) -> tuple[int, int]:
    """Offsets of the text between the markers in ``text`` (read from ``path``)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        absent = [m for m, at in ((START, start), (END, end)) if at < 0] or [f"{END} after {START}"]
        raise MarkerError(f"{path}: no {' and no '.join(absent)}; the benchmark table goes between these markers")
    return start + len(START), end


def current_block(path: Path) -> str:
    text = path.read_text()
    first, last = between_markers(text, path)
    return text[first:last].strip("\n")


def replace_block(path: Path, block: str) -> bool:
    """Put ``block`` between the markers in ``path``; whether the file changed."""
    text = path.read_text()
    first, last = between_markers(text, path)
    updated = text[:first] + "\n" + block + "\n" + text[last:]
    if updated != text:
        path.write_text(updated)
    return updated != text


def pages(results: list[dict[str, Any]]) -> dict[Path, str]:
    return {DOCS_PAGE: render_full(results), README: render_headline(results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is not what the result files give")
    args = parser.parse_args(argv)
    try:
        results = load_results()
        stale = []
        for path, block in pages(results).items():
            if not path.is_file():
                raise MarkerError(f"{path} does not exist; the benchmark table goes between markers in it")
            if args.check:
                if current_block(path) != block:
                    stale.append(path)
            elif replace_block(path, block):
                print(f"rewrote the table in {path.relative_to(REPO_ROOT)}")
    except (ResultError, MarkerError) as error:
        print(f"bench-table: {error}", file=sys.stderr)
        return 2
    if stale:
        print(f"bench-table: out of date: {', '.join(map(str, stale))}; run `make bench-table`", file=sys.stderr)
        return 1
    print(f"bench-table: {len(results)} result file(s) in {RESULTS_DIR.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
