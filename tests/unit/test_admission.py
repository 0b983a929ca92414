"""Fair admission into a model's engine slots (serve.admission.EngineSlots), without Ray."""

from __future__ import annotations

import asyncio

import pytest

from serve.admission import EngineSlots


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_flooding_caller_leaves_the_reserved_slot_to_another():
    async def scenario():
        slots = EngineSlots(slots=4, reserved=1)
        flood = [asyncio.create_task(slots.enter("heavy")) for _ in range(8)]
        await _settle()
        assert slots.held("heavy") == 3 and slots.waiting("heavy") == 5
        await asyncio.wait_for(slots.enter("light"), timeout=1)  # at once: the reserved slot is free
        assert slots.running == 4
        slots.leave("light")
        for _ in range(8):
            slots.leave("heavy")
            await _settle()
        await asyncio.gather(*flood)
        assert slots.running == 0 and slots.waiting() == 0

    asyncio.run(scenario())


def test_a_freed_slot_goes_to_the_caller_with_fewest_in_the_engines():
    async def scenario():
        slots = EngineSlots(slots=2, reserved=0)
        await slots.enter("heavy")
        await slots.enter("heavy")
        order: list[str] = []

        async def wait(caller: str) -> None:
            await slots.enter(caller)
            order.append(caller)

        # heavy queued first, then light: light has nothing in the engines, so it goes first
        waiters = [asyncio.create_task(wait("heavy")), asyncio.create_task(wait("heavy"))]
        await _settle()
        waiters.append(asyncio.create_task(wait("light")))
        await _settle()
        slots.leave("heavy")
        await _settle()
        assert order == ["light"]
        slots.leave("heavy")
        await _settle()
        assert order == ["light", "heavy"]
        for caller in ("light", "heavy"):
            slots.leave(caller)
        await asyncio.gather(*waiters)
        assert order == ["light", "heavy", "heavy"]

    asyncio.run(scenario())


def test_a_cancelled_wait_takes_no_slot():
    async def scenario():
        slots = EngineSlots(slots=1, reserved=0)
        await slots.enter("a")
        waiting = asyncio.create_task(slots.enter("b"))
        await _settle()
        waiting.cancel()
        slots.leave("a")  # the slot must not go to the cancelled waiter
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert slots.running == 0 and slots.waiting() == 0
        await asyncio.wait_for(slots.enter("c"), timeout=1)

    asyncio.run(scenario())


def test_leaving_without_a_slot_is_an_error():
    slots = EngineSlots(slots=1, reserved=0)
    with pytest.raises(RuntimeError, match="holds no slot"):
        slots.leave("nobody")
    with pytest.raises(ValueError, match="slots >= 1"):
        EngineSlots(slots=0, reserved=0)
