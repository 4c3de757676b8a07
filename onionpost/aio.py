"""Small asyncio helpers that the standard library gets subtly wrong for stopping.

Python 3.11's :func:`asyncio.wait_for` can swallow a cancellation when the awaited operation
completes at the same moment (fixed in 3.12): the task goes on as if nothing had happened,
for example into a 25-second long-poll, and whoever cancelled it waits that long.
:func:`cancel_and_wait` therefore cancels again until the task has really ended.
"""

from __future__ import annotations

import asyncio
import contextlib

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
