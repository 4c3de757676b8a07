"""Periodic work, driven by APScheduler 3.x in the node's event loop (its only importer).

The tables are the truth (the outbox, the submission queue, the key files); jobs only decide
*when* to look at them, so a job that runs late, twice, or after a crash does no harm.  Each
job runs at most once at a time and missed runs coalesce into one.  :meth:`Scheduler.wake`
runs a job now: an accepted submission wakes delivery instead of waiting for the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from onionpost.aio import cancel_and_wait, foreground
from onionpost.errors import OnionpostError

log = logging.getLogger(__name__)


class _SkippedRuns(logging.Filter):
    """APScheduler warns whenever a run is skipped because the job still runs; with
    coalescing that is the intended behaviour (a wake-up during a run is kept, see wake)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


logging.getLogger("apscheduler.scheduler").addFilter(_SkippedRuns())
logging.getLogger("apscheduler.executors.default").addFilter(_SkippedRuns())

Job = Callable[[], Awaitable[object]]


class Scheduler:
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone=UTC)
        self._names: set[str] = set()
        self._running: set[str] = set()
        self._again: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._stopping = False

    def every(self, name: str, seconds: float, job: Job, *, start_in: float = 0.0) -> None:
        """Run ``job`` every ``seconds`` (first run after ``start_in`` seconds)."""

        async def guarded() -> None:
            task = asyncio.current_task()
            if self._stopping or task is None:
                return
            self._running.add(name)
            self._tasks.add(task)
            try:
                while True:
                    self._again.discard(name)
                    try:
                        await foreground.yield_to()  # a client waiting goes first
                        await job()
                    except OnionpostError as exc:
                        log.warning("%s: %s", name, exc)
                    except Exception:
                        log.exception("job %s failed unexpectedly", name)
                    if name not in self._again or self._stopping:
                        break  # nobody woke the job while it ran
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                # Cancelled by stop(): the tables are the truth, so the job simply ends here
                # (APScheduler would report a cancelled job as an error with a traceback).
            finally:
                self._running.discard(name)
                self._tasks.discard(task)

        self._scheduler.add_job(
            guarded,
            "interval",
            seconds=seconds,
            id=name,
            name=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.now(UTC) + timedelta(seconds=start_in),
        )
        self._names.add(name)

    def wake(self, name: str) -> None:
        """Run a job as soon as possible (once, even if woken many times meanwhile).

        A wake-up while the job runs is not lost: the job runs once more when it finishes
        (the work that woke it may have arrived after the running pass looked).
        """
        if name in self._running:
            self._again.add(name)
            return
        job = self._scheduler.get_job(name)
        if job is not None:
            job.modify(next_run_time=datetime.now(UTC))

    def names(self) -> list[str]:
        return sorted(self._names)

    def start(self) -> None:
        self._stopping = False
        self._scheduler.start()

    async def stop(self, grace: float = 5.0) -> None:
        """Stop scheduling, cancel the jobs that are running and wait for them to end.

        Waiting matters: the node closes its databases next, and a delivery or sealing pass
        that was still unwinding would then fail noisily.  Every job ends at its next await
        when cancelled; ``grace`` only bounds a job stuck in code that does not await.
        """
        self._stopping = True
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)  # also cancels the jobs' tasks
        tasks = [t for t in self._tasks if not t.done()]
        await asyncio.gather(*(cancel_and_wait(t, grace) for t in tasks))
