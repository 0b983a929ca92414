"""Fair admission of requests into a model's engines: fair queuing by engine slots, per caller.

vLLM's priority scheduling orders the engine's waiting queue, but a request that finds every running
slot (``max_num_seqs``) taken by another caller's long answers still waits for one of them to finish.
Measured (``docs/results/serve_fairness.json``), priorities alone left a light caller 8.5x slower
under another key's flood. So the ingress also holds the engines' slots: no caller may fill the last
``reserved`` of them, and when a slot frees, the waiting caller with the fewest requests in the
engines goes next (ties: who waited longest). A caller alone still gets all but the reserved slots.

Hand-written: Ray Serve's request router balances replicas, not callers, and no asyncio library
does per-caller fair queuing; this is a few dozen lines over asyncio futures.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from dataclasses import dataclass, field


@dataclass
class _Caller:
    running: int = 0
    waiting: deque[tuple[int, asyncio.Future[None]]] = field(default_factory=deque)


class EngineSlots:
    """``slots`` requests in a model's engines at once, at most ``slots - reserved`` (and at least one) from one
    caller; every ``enter`` that returns is matched by one ``leave``."""

    def __init__(self, slots: int, reserved: int):
        if slots < 1 or reserved < 0:
            raise ValueError(f"EngineSlots needs slots >= 1 and reserved >= 0, got {slots} and {reserved}")
        self.slots = slots
        self.per_caller = max(1, slots - reserved)
        self._running = 0
        self._callers: dict[str, _Caller] = {}
        self._order = itertools.count()

    @property
    def running(self) -> int:
        return self._running

    def waiting(self, caller: str | None = None) -> int:
        callers = [self._callers.get(caller)] if caller is not None else list(self._callers.values())
        return sum(len(c.waiting) for c in callers if c is not None)

    def held(self, caller: str) -> int:
        found = self._callers.get(caller)
        return found.running if found else 0

    async def enter(self, caller: str) -> None:
        """Wait for this caller's turn and a free slot."""
        state = self._callers.setdefault(caller, _Caller())
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiting.append((next(self._order), granted))
        self._dispatch()
        try:
            await granted
        except asyncio.CancelledError:  # the client went away: a slot it was just given goes back
            if granted.done() and not granted.cancelled():
                self.leave(caller)
            else:
                state.waiting = deque(w for w in state.waiting if w[1] is not granted)
                self._forget(caller)
            raise

    def leave(self, caller: str) -> None:
        state = self._callers.get(caller)
        if state is None or state.running == 0:
            raise RuntimeError(f"EngineSlots.leave for {caller!r}, which holds no slot")
        state.running -= 1
        self._running -= 1
        self._forget(caller)
        self._dispatch()

    def _forget(self, caller: str) -> None:
        state = self._callers.get(caller)
        if state is not None and state.running == 0 and not state.waiting:
            del self._callers[caller]

    def _dispatch(self) -> None:
        while self._running < self.slots:
            ready = [
                (state.running, state.waiting[0][0], caller)
                for caller, state in self._callers.items()
                if state.waiting and state.running < self.per_caller
            ]
            if not ready:
                return
            _, _, caller = min(ready)
            state = self._callers[caller]
            _, granted = state.waiting.popleft()
            if granted.done():  # cancelled, its waiter not yet resumed to remove it
                self._forget(caller)
                continue
            state.running += 1
            self._running += 1
            granted.set_result(None)
