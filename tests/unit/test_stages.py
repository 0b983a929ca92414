"""The stage registry: what each stage declares it reads is what its code reads, every stage can be
submitted, and the CLI, the report and `loom submit` all take their stages from it."""

from __future__ import annotations

import ast
import importlib
import inspect
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.stages import STAGE_NAMES, STAGES
from pipelines.artifacts import ARTIFACTS
from tests.conftest import REPO_ROOT, TINY

PACKAGES = ("pipelines", "tune", "serve")
#: Where the artifacts are declared (it names them all) and the run directory below it: not a stage's reads.
SHARED = {"pipelines.artifacts", "pipelines.runs"}
#: The package each stage's own code lives in.
HOMES = {"data": "pipelines.data", "tune": "tune", "train": "pipelines.train", "compress": "pipelines.compress",
         "serve": "serve"}  # fmt: skip


def _source_file(module: str) -> Path | None:
    base = REPO_ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(tree: ast.AST) -> set[str]:
    """Loom modules a tree imports anywhere (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES and m not in SHARED and _source_file(m)}


def _names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name)
    return names


def artifacts_read(stage_name: str) -> set[str]:
    """The artifact types a stage's code names: its registry function (and the registry's helpers it calls),
    and every Loom module those import, followed transitively."""
    stages_module = importlib.import_module("cluster.stages")
    entry = ast.parse(inspect.getsource(STAGES[stage_name].run))
    trees = [entry]
    for name in _names(entry):
        helper = getattr(stages_module, name, None)
        if inspect.isfunction(helper) and helper.__module__ == "cluster.stages":
            trees.append(ast.parse(inspect.getsource(helper)))
    queue = [m for tree in trees for m in _imports(tree)]
    seen: set[str] = set()
    while queue:
        module = queue.pop()
        if module in seen:
            continue
        seen.add(module)
        tree = ast.parse(_source_file(module).read_text())
        trees.append(tree)
        queue.extend(_imports(tree))
    named = set().union(*(_names(tree) for tree in trees))
    return {a.__name__ for a in ARTIFACTS if a.__name__ in named and a.stage != stage_name}


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_each_stage_reads_what_it_declares(name):
    declared = {artifact.__name__ for artifact in STAGES[name].reads}
    assert artifacts_read(name) == declared, (
        f"stage {name!r} declares it reads {sorted(declared)} in cluster/stages.py; its code reads "
        f"{sorted(artifacts_read(name))}"
    )


def test_a_stage_reads_only_from_stages_before_it():
    for position, (name, stage) in enumerate(STAGES.items()):
        assert set(stage.upstream) <= set(STAGE_NAMES[:position]), f"{name} reads from a later stage: {stage.upstream}"


def test_no_module_reaches_into_another_stages_folder():
    """Another stage's outputs are read through pipelines.artifacts, never by building its path by hand."""
    offenders = []
    for package in ("cluster", *PACKAGES):
        for path in (REPO_ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            own = next((stage for stage, home in HOMES.items() if module.startswith(home)), None)
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "stage_dir"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value != own
                ):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} stage_dir({node.args[0].value!r})")
    assert not offenders, offenders


def test_cli_report_and_submit_take_their_stages_from_the_registry():
    from cluster.cli import COMMANDS, build_parser, stages_used
    from cluster.report import STAGE_ORDER
    from cluster.submit import SUBMITTABLE

    assert STAGE_NAMES == ("data", "tune", "train", "compress", "eval", "serve")
    assert all(COMMANDS[name][1] == STAGES[name].summary for name in STAGE_NAMES)
    assert STAGE_ORDER == STAGE_NAMES and SUBMITTABLE == (*STAGE_NAMES, "run")
    submit = build_parser().parse_args(["submit", "compress", str(TINY), "--address", "http://127.0.0.1:1"])
    assert stages_used(submit) == ("compress",)
    assert stages_used(build_parser().parse_args(["run", str(TINY)])) == STAGE_NAMES


@pytest.mark.parametrize("name", [*STAGE_NAMES, "run"])
def test_every_stage_can_be_submitted(name):
    """The job's entrypoint is built for every stage, and the module it runs starts that stage's command."""
    from cluster.submit import entrypoint

    command = entrypoint(name, TINY, ["train.lr=1e-3"])
    assert command.startswith("python -m ") and command.endswith("--config pipelines/recipes/tiny.yaml train.lr=1e-3")
    argv = [*shlex.split(command)[1:], "--help"]  # the job's own command line, asked for its usage
    shown = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"usage: loom {name}" in shown.stdout
