"""The performance tables are generated, not typed: what is between the markers in README.md and
docs/src/benchmarks.md is exactly what ``python -m tests.benchmarks.table`` renders from the committed
result files, and a result file that lacks what the table needs is refused with a message naming it."""

from __future__ import annotations

import json
import re

import pytest

from tests.benchmarks import table


@pytest.fixture(scope="module")
def results():
    return table.load_results()


@pytest.mark.parametrize("page", [table.README, table.DOCS_PAGE], ids=["README.md", "docs/src/benchmarks.md"])
def test_the_tables_are_the_ones_the_result_files_give(results, page):
    assert page.is_file(), f"{page} does not exist"
    expected = table.pages(results)[page]
    assert table.current_block(page) == expected, (
        f"the benchmark table in {page} is not the one docs/results/*.json give: run `make bench-table`"
    )


def test_every_committed_result_has_three_runs_and_a_command(results):
    for result in results:
        assert result["runs"] >= table.MIN_RUNS
        # `make bench` or `make bench-scale`, with the sizes the scale benchmarks were run at.
        assert re.match(r'(?:LOOM_[A-Z_]+=\S+ )*make bench(?:-scale)? PYTEST_ARGS="-k \w+"$', result["command"]), (
            result["command"]
        )
        for compared in result["comparisons"]:
            assert len(compared["values"]) == result["runs"], (result["benchmark"], compared["name"])


def test_each_headline_comes_from_a_comparison_the_file_holds(results):
    rendered = table.render_headline(results)
    by_name = {r["benchmark"]: r for r in results}
    for benchmark, name in table.HEADLINES:
        if benchmark in by_name:
            compared = next(c for c in by_name[benchmark]["comparisons"] if c["name"] == name)
            assert table.compared_cell(compared) in rendered


def _one_result(tmp_path):
    source = sorted(table.RESULTS_DIR.glob("*.json"))
    if not source:
        pytest.skip("no committed result file to start from")
    return json.loads(source[0].read_text())


@pytest.mark.parametrize("field", ["command", "machine", "date", "comparisons"])
def test_a_result_missing_a_required_field_is_refused(tmp_path, field):
    result = _one_result(tmp_path)
    del result[field]
    (tmp_path / "broken.json").write_text(json.dumps(result))
    with pytest.raises(table.ResultError, match=rf"broken\.json: the result is missing required field\(s\) {field}"):
        table.load_results(tmp_path)


def test_a_comparison_missing_its_spread_or_a_machine_without_cpu_is_refused(tmp_path):
    result = _one_result(tmp_path)
    del result["comparisons"][0]["max"]
    (tmp_path / "spread.json").write_text(json.dumps(result))
    with pytest.raises(table.ResultError, match=r"comparison 0 is missing required field\(s\) max"):
        table.load_results(tmp_path)
    result = _one_result(tmp_path)
    del result["machine"]["cpu"]
    with pytest.raises(table.ResultError, match=r"machine is missing required field\(s\) cpu"):
        table.validate(result, "machine.json")


def test_fewer_than_three_runs_is_refused(tmp_path):
    result = _one_result(tmp_path)
    result["runs"] = 1
    with pytest.raises(table.ResultError, match="at least 3"):
        table.validate(result, "one-run.json")


def test_only_the_text_between_the_markers_is_replaced(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nprose before\n{table.START}\nold | table\n{table.END}\nprose after\n")
    assert table.replace_block(page, "| new |")
    assert page.read_text() == f"# Title\n\nprose before\n{table.START}\n| new |\n{table.END}\nprose after\n"
    assert not table.replace_block(page, "| new |")


def test_a_page_without_the_markers_is_refused_with_a_clear_message(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n{table.START}\nno end marker\n")
    with pytest.raises(table.MarkerError, match=r"page\.md: no <!-- loom:bench-table:end -->"):
        table.replace_block(page, "| new |")
    assert page.read_text() == f"# Title\n{table.START}\nno end marker\n"
