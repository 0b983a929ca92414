"""Imports run one way: the entry layer on top, the stages beside each other, shared leaves below.

Every import counts, at module level or inside a function (a lazy import is still an arrow);
``__main__`` modules are entry points and sit on top by nature.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("cluster", "pipelines", "serve", "tune")
#: Which top-level packages each may import. cluster/ is the entry layer (CLI, root recipe, chain,
#: job submission, Ray connection); pipelines/ holds the data and train stages and the shared
#: leaves (schema, run directory, model); serve/ and tune/ are stages on those leaves.
ALLOWED = {
    "cluster": {"pipelines", "serve", "tune"},
    "pipelines": set(),
    "serve": {"pipelines"},
    "tune": {"pipelines"},
}
#: Entry points of the stages and of the CLI: only the entry layer may import them.
ENTRY_MODULES = ("pipelines.data.stage", "pipelines.train.stage", "tune.stage", "serve.stage", "cluster.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the Loom modules it imports (``from a.b import c`` counts as a.b, or a.b.c if a module)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py") if p.name != "__main__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for candidate in candidates:
                if candidate in files:
                    targets.add(candidate)
                    break
        graph[name] = targets - {name}
    return graph


GRAPH = import_graph()


def test_graph_is_read():
    # The graph must see the imports it judges, or every check below passes vacuously.
    assert "pipelines.runs" in GRAPH["cluster.chain"]
    assert "pipelines.data.utils" in GRAPH["pipelines.data.dedup"]
    assert len(GRAPH) > 40


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_downwards_only(package):
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module.split(".")[0] == package
        for target in targets
        if target.split(".")[0] not in ALLOWED[package] | {package}
    )
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


def test_entry_modules_are_imported_from_the_entry_layer_only():
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if target in ENTRY_MODULES and not module.startswith("cluster.")
    )
    assert not wrong, f"a stage imports another stage's (or the CLI's) entry point: {wrong}"


def test_no_module_cycles():
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_reading_a_recipe_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys; from cluster.recipe import load_config; load_config(); "
        "heavy = sorted(m for m in ('numpy', 'pyarrow', 'torch', 'ray') if m in sys.modules); print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
