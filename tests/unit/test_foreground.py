"""Background loops yield to SMTP transactions in flight, but never for longer than a bound.

No timing bounds that a loaded machine could miss: what is checked is the order of events
(a waiter is released by the last transaction ending, not before) and that a wait with
nobody busy, or past its bound, returns; the bound itself is only checked from below.
"""

from __future__ import annotations

import asyncio
import time

from onionpost.base.aio import Foreground


async def test_nobody_busy_means_no_wait() -> None:
    gate = Foreground()
    t0 = time.perf_counter()
    await gate.yield_to(most=3600)
    assert time.perf_counter() - t0 < 60  # returned without waiting for its bound


async def test_a_waiter_goes_on_when_the_last_transaction_ends() -> None:
    gate = Foreground()
    events: list[str] = []

    async def background() -> None:
        await gate.yield_to(most=3600)
        events.append("background step")

    with gate.busy():
        with gate.busy():
            task = asyncio.create_task(background())
            for _ in range(5):
                await asyncio.sleep(0)
            events.append("first ends")
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()  # one transaction is still in flight
        events.append("last ends")
    await asyncio.wait_for(task, 60)
    assert events == ["first ends", "last ends", "background step"]
    assert not gate.is_busy


async def test_the_wait_is_bounded_while_clients_stay_busy() -> None:
    gate = Foreground()
    with gate.busy():  # a client that never finishes its transaction
        t0 = time.perf_counter()
        await gate.yield_to(most=0.05)
        assert time.perf_counter() - t0 >= 0.04
        assert gate.is_busy


async def test_an_exception_inside_a_transaction_still_releases_waiters() -> None:
    gate = Foreground()
    task: asyncio.Task[None] | None = None
    try:
        with gate.busy():
            task = asyncio.create_task(gate.yield_to(most=3600))
            await asyncio.sleep(0)
            raise ValueError("the client hung up")
    except ValueError:
        pass
    assert task is not None
    await asyncio.wait_for(task, 60)
    assert not gate.is_busy


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    gate = Foreground()
    with gate.busy():
        task = asyncio.create_task(gate.yield_to(most=3600))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not gate._waiters


async def test_busy_lately_covers_the_pause_between_two_transactions() -> None:
    """The sealing job hands over one message at a time while clients keep coming: a pause
    between two transactions still counts as busy, for ``within`` seconds after the last."""
    gate = Foreground()
    assert not gate.busy_lately(within=3600)  # never busy
    with gate.busy():
        assert gate.busy_lately(within=0)
    assert gate.busy_lately(within=3600)  # just ended
    assert not gate.busy_lately(within=0)
