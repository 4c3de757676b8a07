"""Time as a dependency.

Protocol and crypto code never read the clock: callers pass ``now`` (whole seconds since the
Unix epoch, UTC) in.  Everything that waits or schedules takes a :class:`Clock`, so tests run
days of store-and-forward in milliseconds with :class:`FakeClock`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> int:
        """Seconds since the Unix epoch."""
        ...

    def monotonic(self) -> float:
        """A clock for measuring intervals; never goes backwards."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> int:
        return int(time.time())

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class FakeClock:
    """A clock that moves only when told to; sleepers wake when it passes their deadline."""

    def __init__(self, start: int = 1_800_000_000) -> None:
        self._now = float(start)
        self._waiters: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> int:
        return int(self._now)

    def monotonic(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._now + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        self._now += seconds
        due = [(t, f) for t, f in self._waiters if t <= self._now]
        self._waiters = [(t, f) for t, f in self._waiters if t > self._now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)


async def wait_event(clock: Clock, event: asyncio.Event, seconds: float) -> bool:
    """Wait until ``event`` is set or ``seconds`` have passed on ``clock``; return whether it
    was set.

    What a worker does between passes (woken by new work, or looking again after a while).
    Timing it with ``asyncio.timeout`` would wait real seconds under a :class:`FakeClock`;
    here the timeout is a ``clock.sleep``, so advancing a fake clock ends it.
    """
    if event.is_set():
        return True
    if seconds <= 0:
        return False
    waiter = asyncio.ensure_future(event.wait())
    sleeper = asyncio.ensure_future(clock.sleep(seconds))
    try:
        await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, sleeper):
            task.cancel()
        # Both end at once when cancelled; collected so none is reported as never retrieved.
        await asyncio.gather(waiter, sleeper, return_exceptions=True)
    return event.is_set()
