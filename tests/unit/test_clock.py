"""wait_event (onionpost/base/clock.py): a worker's pause between passes ends on its Clock."""

from __future__ import annotations

import asyncio

from onionpost.base.clock import FakeClock, SystemClock, wait_event


async def _settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_fake_clock_ends_the_wait() -> None:
    clock, event = FakeClock(), asyncio.Event()
    task = asyncio.create_task(wait_event(clock, event, 30))
    await _settle()
    clock.advance(29)
    await _settle()
    assert not task.done()
    clock.advance(1)
    assert await asyncio.wait_for(task, 5) is False


async def test_the_event_ends_the_wait() -> None:
    clock, event = FakeClock(), asyncio.Event()
    task = asyncio.create_task(wait_event(clock, event, 3600))
    await _settle()
    event.set()
    assert await asyncio.wait_for(task, 5) is True


async def test_set_or_zero_returns_at_once() -> None:
    clock, event = FakeClock(), asyncio.Event()
    assert await wait_event(clock, event, 0) is False
    assert await wait_event(clock, event, -5) is False
    event.set()
    assert await wait_event(clock, event, 3600) is True


async def test_system_clock_times_out() -> None:
    assert await wait_event(SystemClock(), asyncio.Event(), 0.01) is False


async def test_cancelling_the_waiter_leaves_nothing_behind() -> None:
    clock, event = FakeClock(), asyncio.Event()
    before = len(asyncio.all_tasks())
    task = asyncio.create_task(wait_event(clock, event, 3600))
    await _settle()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    await _settle()
    assert len(asyncio.all_tasks()) == before
