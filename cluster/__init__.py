"""How Loom work reaches a Ray cluster: CLI, recipes, the stage chain, connection, job submission.

Every Loom command (``loom``, ``python -m pipelines.data`` and the other stage modules, a Ray job's
entrypoint) imports this package first, so a Python that is not Loom's environment is named here rather
than failing later on a bare ``No module named 'ray'``.
"""

import importlib.util
import sys

#: What Loom's commands import before anything else; any one missing means another Python's packages.
REQUIRED_PACKAGES = ("yaml", "pydantic", "ray")


def _installed(name: str) -> bool:
    # A bare folder of that name on sys.path (Ray's /tmp/ray, when run from /tmp) is a namespace package
    # without an origin, not the package.
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


_missing = [name for name in REQUIRED_PACKAGES if not _installed(name)]
if _missing:
    raise ImportError(
        f"{sys.executable} is not the Python environment Loom was installed in: it lacks {', '.join(_missing)}. "
        "Run Loom with that environment's python: `make setup` makes .venv here, and a cluster.yaml node has "
        "~/loom-venv (Ray started from it gives jobs its python); or name it in the entrypoint, e.g. "
        "`ray job submit ... -- ~/loom-venv/bin/python -m pipelines.data --config RECIPE`"
    )
