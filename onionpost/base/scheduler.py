"""Periodic work on the node's :class:`~onionpost.base.clock.Clock`: the one way queues are driven.

The tables are the truth (the outbox, the submission queue, the key files); jobs only decide
*when* to look at them, so a job that runs late, twice, or after a crash does no harm.  Each
job runs at most once at a time and missed runs coalesce into one.  :meth:`Scheduler.wake`
runs a job now: an accepted submission wakes delivery instead of waiting for the next tick.

The node and the integration tests' harness build the same jobs on the same scheduler
(:func:`onionpost.app.node.queue_jobs`), so the tests run what ships.  Every wait is a
``clock`` wait (:func:`~onionpost.base.clock.wait_event`): under a
:class:`~onionpost.base.clock.FakeClock`, moving the clock is what makes a tick come.  (This
replaced APScheduler, which could only count real seconds.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from onionpost.base.aio import cancel_and_wait, foreground
from onionpost.base.clock import Clock, SystemClock, wait_event
from onionpost.core.errors import OnionpostError

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[object]]


@dataclass
class _Entry:
    name: str
    seconds: float
    job: Job
    start_in: float
    #: Set by wake(): run as soon as possible (or once more, if it is running now).
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    #: Clock.monotonic() of the next planned run; None before start and while running.
    next_at: float | None = None
    task: asyncio.Task[None] | None = None


class Scheduler:
    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._entries: dict[str, _Entry] = {}
        self._started = False
        self._stopping = False

    def every(self, name: str, seconds: float, job: Job, *, start_in: float = 0.0) -> None:
        """Run ``job`` every ``seconds`` (first run after ``start_in`` seconds).

        Runs are spaced from start to start; a run that overruns its interval skips the
        ticks it missed rather than running again at once (they coalesce into the next).
        """
        if name in self._entries:
            raise ValueError(f"job {name!r} is scheduled already")
        entry = _Entry(name, seconds, job, start_in)
        self._entries[name] = entry
        if self._started:
            self._launch(entry)

    def wake(self, name: str) -> None:
        """Run a job as soon as possible (once, even if woken many times meanwhile).

        A wake-up while the job runs is not lost: the job runs once more when it finishes
        (the work that woke it may have arrived after the running pass looked).  Waking a
        job that does not exist does nothing.
        """
        entry = self._entries.get(name)
        if entry is not None:
            entry.woken.set()

    def names(self) -> list[str]:
        return sorted(self._entries)

    def due_in(self, name: str) -> float | None:
        """Seconds until the job's next planned run (on the clock), or None while it runs
        or before the scheduler started."""
        entry = self._entries.get(name)
        if entry is None or entry.next_at is None:
            return None
        return entry.next_at - self.clock.monotonic()

    def start(self) -> None:
        self._stopping = False
        self._started = True
        for entry in self._entries.values():
            if entry.task is None or entry.task.done():
                self._launch(entry)

    def _launch(self, entry: _Entry) -> None:
        entry.task = asyncio.get_running_loop().create_task(
            self._loop(entry), name=f"job {entry.name}"
        )

    async def _loop(self, entry: _Entry) -> None:
        clock = self.clock
        entry.next_at = clock.monotonic() + entry.start_in
        try:
            while not self._stopping:
                await wait_event(clock, entry.woken, entry.next_at - clock.monotonic())
                if self.stopping():  # stop() came while it waited
                    break
                entry.woken.clear()  # a wake-up from here on means "once more"
                started = clock.monotonic()
                entry.next_at = None
                try:
                    await foreground.yield_to()  # a client waiting goes first
                    await entry.job()
                except OnionpostError as exc:
                    log.warning("%s: %s", entry.name, exc)
                except Exception:
                    log.exception("job %s failed unexpectedly", entry.name)
                # The next tick on the grid of this run's start, skipping the ones missed.
                due = started + entry.seconds
                now = clock.monotonic()
                if due <= now and entry.seconds > 0:
                    due += entry.seconds * (int((now - due) // entry.seconds) + 1)
                entry.next_at = due
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            # Cancelled by stop(): the tables are the truth, so the job simply ends here.
        finally:
            entry.next_at = None

    def stopping(self) -> bool:
        return self._stopping

    async def stop(self, grace: float = 5.0) -> None:
        """Stop scheduling, cancel the jobs that are running and wait for them to end.

        Waiting matters: the node closes its databases next, and a delivery or sealing pass
        that was still unwinding would then fail noisily.  Every job ends at its next await
        when cancelled; ``grace`` only bounds a job stuck in code that does not await.
        """
        self._stopping = True
        self._started = False
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for entry in self._entries.values():
            entry.task = None
        await asyncio.gather(*(cancel_and_wait(t, grace) for t in tasks if not t.done()))
