"""A real headless browser for the tests: Debian's Chromium, started once per page.

``.ci/run`` installs it; on a machine without it the tests that need it skip, except under CI,
where a missing browser fails them.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import system_tool

# Without the networking switches Chromium keeps trying to reach Google's hosts from a closed network.
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--allow-file-access-from-files",
)  # fmt: skip


@dataclass
class RenderedPage:
    dom: str
    screenshot: Path

    def body_attribute(self, name: str) -> str | None:
        found = re.search(rf'<body[^>]*\sdata-{name}="([^"]*)"', self.dom)
        return found.group(1) if found else None


def render(page: Path, screenshot: Path, width: int = 1280, height: int = 2400) -> RenderedPage:
    """Load ``page`` in Chromium: the DOM after its load handlers ran, and a screenshot."""
    chromium = system_tool("chromium")
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="loom-chromium-") as profile:
        common = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]
        # A virtual time budget lets the load event (and its handlers) finish before the dump.
        dom = subprocess.run(
            [*common, "--virtual-time-budget=5000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120, check=True,
        ).stdout  # fmt: skip
        subprocess.run(
            [*common, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120, check=True
        )
    return RenderedPage(dom, screenshot)
