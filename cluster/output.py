"""What reaches the terminal: Loom's own lines, one progress bar per stage and errors in full.

Ray's, vLLM's and DeepSpeed's logs go to ``<run>/logs/``: the driver's Python logging to
``loom.log``, and every Ray worker's output (Train workers, engine replicas) stays in Ray's
session log folder, linked as ``logs/ray``. ``--verbose`` shows all of it live, as before.
"""

from __future__ import annotations

import logging
import os
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
        # Ray Serve LLM replaces the root logger's handlers with its own JSON one when this module is first
        # imported (ray 2.60; at `import ray.serve.llm`, mid-run): imported first, it cannot undo the set-up.
        try:
            import ray.llm._internal.serve.observability  # noqa: F401
        except ImportError:
            pass
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.setLevel(logging.INFO)
        root.addHandler(to_file)
        root.addHandler(to_terminal)
        self.to_file = to_file
        logging.captureWarnings(not self.verbose)  # libraries' warnings to the log file, through the root
        if not self.verbose:
            # Libraries that add terminal handlers or print on their own, switched off the documented way
            # (read when Serve is imported / when a sweep starts; the embedded Ray's processes inherit them).
            os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")  # Serve: its log files only
            os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM: no handlers of its own
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune: the legacy reporter, silent at verbose=0
        import ray  # noqa: F401  -- Ray sets up its loggers' own terminal handlers on import

        if not self.verbose:
            import optuna  # its handler appears with the first study, mid-run: switched off its own way

            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()

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
                if handler is not self.to_file:
                    logger.removeHandler(handler)
            logger.propagate = True
        # Ray Serve LLM gives each of its loggers a terminal handler unless "ray.serve" has one already.
        serve_logger = logging.getLogger("ray.serve")
        if self.to_file not in serve_logger.handlers:
            serve_logger.addHandler(self.to_file)
        serve_logger.propagate = False

    def after_connect(self, embedded: bool) -> None:
        """Ray is up: no Ray Data progress bars, library loggers quiet, the embedded Ray's session logs linked."""
        if not self.verbose:
            import ray.data

            ray.data.DataContext.get_current().enable_progress_bars = False
        self.quiet_libraries()
        # Where this cluster writes every worker's output (not /tmp/ray/session_latest, which is whichever cluster
        # started last on the machine); a remote cluster keeps them on its nodes.
        session_logs = Path(ray_session_dir()) / "logs" if embedded else None
        link = self.logs / "ray"
        if session_logs is not None and session_logs.is_dir():
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(session_logs, target_is_directory=True)

    def where(self) -> str:
        return f"[loom] logs: {self.log_file}; Ray workers, vLLM and DeepSpeed: {self.logs / 'ray'}/"


def ray_session_dir() -> str:
    """This process's Ray session folder (its logs, its metrics discovery file)."""
    import ray

    return ray._private.worker.global_worker.node.get_session_dir_path()  # no public API names it
