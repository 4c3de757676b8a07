"""Small asyncio helpers that the standard library gets subtly wrong for stopping.

Python 3.11's :func:`asyncio.wait_for` can swallow a cancellation when the awaited operation
completes at the same moment (fixed in 3.12): the task goes on as if nothing had happened,
for example into a 25-second long-poll, and whoever cancelled it waits that long.
:func:`cancel_and_wait` therefore cancels again until the task has really ended.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
import time
from collections.abc import Iterator

#: How often a task that survived its cancellation is cancelled again.
RECANCEL_SECONDS = 0.5


async def cancel_and_wait(task: asyncio.Task[object], grace: float | None = None) -> bool:
    """Cancel ``task`` and wait until it has ended, cancelling it again every
    :data:`RECANCEL_SECONDS` in case a cancellation was lost.  Gives up after ``grace``
    seconds (None: never) and returns whether the task ended; its outcome is not raised."""
    loop = asyncio.get_running_loop()
    deadline = None if grace is None else loop.time() + grace
    while not task.done():
        task.cancel()
        wait = RECANCEL_SECONDS
        if deadline is not None:
            wait = min(wait, deadline - loop.time())
            if wait <= 0:
                return False
        await asyncio.wait({task}, timeout=wait)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()  # retrieved, so asyncio does not report it as never retrieved
    return True


# -- the crypto worker pool -----------------------------------------------------------------


class _Pool:
    """The process's crypto pool and its size (None: one worker per CPU)."""

    executor: concurrent.futures.ThreadPoolExecutor | None = None
    workers: int | None = None


def crypto_workers() -> int:
    """How many threads open envelopes: one per CPU (libsodium releases the GIL, so opening
    several fetched messages uses every core), unless :func:`set_crypto_workers` said
    otherwise."""
    return _Pool.workers or os.cpu_count() or 1


def crypto_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's pool for pure crypto work (no sockets, no database, no shared state):
    it keeps the event loop free while a batch of messages is opened.  A node makes its own,
    sized by its configuration (:func:`new_crypto_pool`); this one serves the rest."""
    if _Pool.executor is None:
        _Pool.executor = new_crypto_pool(_Pool.workers)
    return _Pool.executor


def new_crypto_pool(workers: int | None) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of ``workers`` threads for pure crypto work (None or 0: one per CPU); its owner
    shuts it down.  ``delivery.crypto_workers`` sizes the node's, so the bench can compare 1
    and 2 workers on two nodes side by side."""
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=workers or os.cpu_count() or 1, thread_name_prefix="crypto"
    )


def set_crypto_workers(workers: int | None) -> None:
    """Size the pool (None: one per CPU); the next :func:`crypto_pool` call makes a new one.
    For the bench, which compares 1 and 2 workers."""
    old, _Pool.executor, _Pool.workers = _Pool.executor, None, workers
    if old is not None:
        old.shutdown(wait=True)


# -- foreground before background -----------------------------------------------------------

#: The longest a background step waits for the foreground to go quiet: under a sustained
#: burst of submissions, background work still takes one step this often, so nothing it does
#: (sealing, delivery, syncing, filing) stops, and the backlog drains once the burst ends.
MAX_DEFER_SECONDS = 0.1


class Foreground:
    """Work a client is waiting on, counted so that background loops can yield to it.

    One event loop runs the SMTP gateway and the node's own background work for the mail it
    accepted (sealing, the outbox's delivery, the devices' sync, filing).  asyncio has no
    priorities, so during a burst of submissions the background work took more than half of
    the loop and every 250 waited behind it (docs/performance.md, SMTP submission).  An SMTP
    transaction marks itself :meth:`busy` while its DATA is read and committed; a background
    loop calls :meth:`yield_to` before each step, which returns at once when no transaction
    is in flight and otherwise waits until none is, or :data:`MAX_DEFER_SECONDS` at most.
    A client cannot stall the node this way: the wait is bounded whatever it does.
    """

    def __init__(self) -> None:
        self._busy = 0
        self._waiters: set[asyncio.Future[None]] = set()
        self._idle_since = -math.inf  # time.monotonic() when the last one ended

    @property
    def is_busy(self) -> bool:
        return self._busy > 0

    def busy_lately(self, within: float = MAX_DEFER_SECONDS) -> bool:
        """Whether foreground work is in flight, or ended less than ``within`` seconds ago
        (clients keep coming: a burst pauses between two transactions, it does not end)."""
        return self._busy > 0 or time.monotonic() - self._idle_since < within

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle_since = time.monotonic()
                self._release()

    def _release(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            # Each waiter belongs to its own loop (tests run several nodes in one process).
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                fut.get_loop().call_soon_threadsafe(_wake_waiter, fut)

    async def yield_to(self, most: float = MAX_DEFER_SECONDS) -> None:
        """Wait until no foreground work is in flight, or ``most`` seconds."""
        if self._busy == 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(most):
                    await fut
        finally:
            self._waiters.discard(fut)


def _wake_waiter(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


#: The process's one :class:`Foreground` (the SMTP gateway marks it, background loops yield).
foreground = Foreground()
