"""cancel_and_wait ends a task even when a cancellation gets lost (3.11's wait_for can)."""

from __future__ import annotations

import asyncio

from onionpost.base.aio import cancel_and_wait


async def test_a_task_that_swallows_its_first_cancellation_still_ends() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed += 1  # as if a wait_for had completed at that very moment
        await asyncio.sleep(3600)  # e.g. on into a long-poll

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task) is True
    assert task.cancelled() and swallowed == 1


async def test_gives_up_after_its_grace() -> None:
    stubborn = True

    async def immortal() -> None:
        while stubborn:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, grace=0.2) is False
    stubborn = False  # let it go, so the test leaves nothing running
    task.cancel()
    await asyncio.wait({task})
