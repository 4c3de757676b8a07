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
import os

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
