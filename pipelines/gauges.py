"""Ray metrics gauges that keep their value for as long as the process lives.

Ray exports a gauge's value only while the process keeps setting it: its metrics agent drops a
series about two report intervals after the last ``set`` (the time-to-live in Ray 2.60's
``OpenTelemetryMetricRecorder``). A value set once (the data stage's counts, a model's autoscaling
ceiling) would vanish from Prometheus seconds later, before a rule or dashboard reads it. A daemon
thread sets every held value again each second, within Ray's shortest report interval.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

PERIOD_S = 1.0


class HeldGauges:
    """Gauges set again every ``PERIOD_S``; the latest value for a (metric, tags) pair wins."""

    def __init__(self):
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[Any, float, dict[str, str]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, gauge, value: float, tags: dict[str, str]) -> None:
        gauge.set(value, tags=tags)
        with self._lock:
            self._values[(gauge.info["name"], tuple(sorted(tags.items())))] = (gauge, value, dict(tags))
            if self._thread is None:
                self._thread = threading.Thread(target=self._keep, name="loom-held-gauges", daemon=True)
                self._thread.start()

    def _keep(self) -> None:
        while True:
            time.sleep(PERIOD_S)
            with self._lock:
                held = list(self._values.values())
            for gauge, value, tags in held:
                gauge.set(value, tags=tags)


@functools.cache
def held_gauges() -> HeldGauges:
    """This process's held gauges (one thread per process, whoever sets them)."""
    return HeldGauges()
