"""What reaches the terminal: Loom's own lines, one progress bar per stage and errors in full.

Ray's, vLLM's and DeepSpeed's logs go to ``<run>/logs/``: the driver's Python logging to
``loom.log``, and every Ray worker's output (Train workers, engine replicas) stays in Ray's
session log folder, linked as ``logs/ray``. ``--verbose`` shows all of it live, as before.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

#: Libraries whose driver-side loggers carry their own terminal handlers.
LIBRARY_LOGGERS = ("ray", "vllm", "deepspeed", "transformers", "torch", "filelock", "urllib3", "httpx", "optuna")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Output:
    """Where a command's output goes; ``quiet`` is everything but ``--verbose``."""

    def __init__(self, run_dir: Path, verbose: bool):
        self.verbose = verbose
        self.logs = run_dir / "logs"
        self.log_file = self.logs / "loom.log"

    def configure(self) -> None:
        """The driver's logging: everything to the log file; the terminal gets errors (all of it with --verbose)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(self.log_file)
        to_file.setFormatter(logging.Formatter(LOG_FORMAT))
        to_terminal = logging.StreamHandler(sys.stderr)
        to_terminal.setFormatter(logging.Formatter(LOG_FORMAT))
        to_terminal.setLevel(logging.INFO if self.verbose else logging.ERROR)
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.INFO)
        root.addHandler(to_file)
        root.addHandler(to_terminal)
        self.quiet_libraries()

    def quiet_libraries(self) -> None:
        """Send libraries' own terminal handlers through the root's instead (their loggers appear on import,
        so this runs again once Ray is connected)."""
        if self.verbose:
            return
        for name in list(logging.root.manager.loggerDict):
            if name.split(".")[0] not in LIBRARY_LOGGERS:
                continue
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
            logger.propagate = True

    def after_connect(self, embedded: bool) -> None:
        """Ray is up: no Ray Data progress bars, library loggers quiet, the embedded Ray's session logs linked."""
        if not self.verbose:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        self.quiet_libraries()
        # Where Ray writes every worker's output on this machine; a remote cluster keeps them on its nodes.
        session_logs = Path("/tmp/ray/session_latest/logs").resolve()
        link = self.logs / "ray"
        if embedded and session_logs.is_dir():
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(session_logs, target_is_directory=True)

    def where(self) -> str:
        return f"[loom] logs: {self.log_file}; Ray workers, vLLM and DeepSpeed: {self.logs / 'ray'}/"
