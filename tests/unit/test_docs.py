"""The docs: the generated reference pages match the code, the MkDocs site builds in strict mode (so a
broken link or anchor fails), and the README stays short with every relative link resolving."""

from __future__ import annotations

import argparse
import difflib
import re
import subprocess
import sys
from pathlib import Path

from cluster import docs

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
MKDOCS_CONFIG = REPO / "docs" / "mkdocs.yml"
README_MAX_LINES = 260


def test_the_committed_reference_pages_are_a_fresh_generation():
    stale = []
    for path, fresh in docs.pages().items():
        committed = path.read_text() if path.is_file() else ""
        if committed != fresh:
            diff = difflib.unified_diff(
                committed.splitlines(), fresh.splitlines(), "committed", "generated", lineterm="", n=1
            )
            stale.append(f"{path.relative_to(REPO)}:\n" + "\n".join(list(diff)[:40]))
    assert not stale, "the reference pages are out of date: run `python -m cluster.docs`\n\n" + "\n\n".join(stale)


def test_the_generation_is_deterministic_and_light():
    """Twice the same text, and no Ray or torch imported to make it (it runs in the unit tests and in `make docs`)."""
    script = (
        "import sys\n"
        "from cluster import docs\n"
        "first = docs.pages()\n"
        "assert first == docs.pages(), 'two generations differ'\n"
        "heavy = sorted({'ray', 'torch', 'vllm', 'deepspeed', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, f'generating the reference pages imported {heavy}'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_recipe_field_and_command_is_in_the_references():
    from cluster.cli import build_parser
    from cluster.recipe import LoomConfig

    recipe = docs.recipe_reference()
    for section, info in LoomConfig.model_fields.items():
        assert f"`{section}`" in recipe
        assert info.description and info.description.split()[0] in recipe
    cli = docs.cli_reference()
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in commands.choices:
        assert f"## loom {name} " in cli


def test_the_site_builds_in_strict_mode(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(MKDOCS_CONFIG), "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "site" / "reference" / "recipe" / "index.html").is_file()


def _relative_links(markdown: str) -> list[str]:
    """Link and image targets outside code, without URLs, mail addresses or in-page anchors."""
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)  # fenced blocks
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
    targets += re.findall(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", text, flags=re.M)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, flags=re.I)]


def test_the_readme_is_short_and_its_relative_links_resolve():
    text = README.read_text()
    lines = len(text.splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move detail to docs/src/"
    )
    links = _relative_links(text)
    assert links, "no relative links found in README.md: the link check would check nothing"
    missing = [link for link in links if not (README.parent / link.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_the_link_check_finds_what_it_should():
    sample = (
        "[a](docs/src/a.md) ![b](img/b.png) [c](https://example.com) [d](#anchor) [e](docs/e.md#part)\n"
        "`[f](not/a/link.md)`\n```\n[g](in/a/block.md)\n```\n[h]: docs/h.md\n"
    )
    assert _relative_links(sample) == ["docs/src/a.md", "img/b.png", "docs/e.md#part", "docs/h.md"]
