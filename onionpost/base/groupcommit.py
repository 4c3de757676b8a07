"""Group commit: concurrent writers share one durable commit, none waits for a timer.

Each SMTP submission must be durable (on disk, power loss included) before its client hears
250, and a durable commit costs fsyncs whose price hardly depends on how much they carry.
Done one at a time, ten clients sending at once queue behind ten commits.  A
:class:`GroupCommit` runs one commit at a time *in a worker thread*; whatever was queued
while it ran becomes the next batch, committed as one, so under load a commit carries many
submissions and when idle a lone one starts at once (the classic leader/follower scheme
without its waiting window: nothing is ever held back to fill a batch).

Guarantees, which the tests check with a committer that records what happened:

* :meth:`GroupCommit.submit` returns only after the batch holding its item returned from the
  commit function, i.e. after that commit is durable.  A failure of the whole batch (the
  commit itself failed) is raised to every item of it; the commit function may also fail
  single items by returning their exception in that item's place.
* At most one commit runs at a time, and batches are committed in the order they were
  formed, items in the order they were submitted.
* A caller that gives up (its task is cancelled: the client hung up) does not stop the
  commit: the item may still be stored, as with any mail server whose client disconnects
  after the final dot.  It is never acknowledged, so nothing acknowledged is ever lost.

The commit function runs in one dedicated thread, so the event loop keeps reading other
clients' data meanwhile and the commit may block on fsync and on the database's write lock
freely.  Everything it touches must belong to it alone (its own database connection).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: What the commit function returns: per item, its result or the exception to raise to it.
Outcomes = Sequence["R | BaseException"]


@dataclass
class _Waiting(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class GroupCommit(Generic[T, R]):
    """Batches items for ``commit``, which runs in a thread and must return one outcome per
    item (a result, or an exception for that item alone) once the batch is durable."""

    def __init__(self, commit: Callable[[list[T]], Outcomes[R]], *, name: str = "commit") -> None:
        self._commit = commit
        self._name = name
        self._queue: list[_Waiting[T, R]] = []
        self._runner: asyncio.Task[None] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )
        #: Sizes of the first batches committed (for the tests), capped.
        self.batches: list[int] = []
        #: Items and commits so far (logged at close, which the bench reads).
        self.items = 0
        self.commits = 0

    async def submit(self, item: T) -> R:
        """Queue ``item``; returns its outcome once the commit that holds it is durable."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiting(item, future))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name=self._name)
        return await future

    async def _run(self) -> None:
        """Commit batches until nothing is queued; each is what queued during the last."""
        loop = asyncio.get_running_loop()
        while self._queue:
            batch, self._queue = self._queue, []
            items = [w.item for w in batch]
            try:
                outcomes: Outcomes[R] | BaseException = await loop.run_in_executor(
                    self._executor, self._commit, items
                )
            except asyncio.CancelledError:
                # Stopping: the batch's fate is unknown to us, so no one hears success.
                for w in batch + self._queue:
                    if not w.future.done():
                        w.future.cancel()
                self._queue = []
                raise
            except Exception as exc:  # the commit itself failed: every item of it did
                outcomes = exc
            if not isinstance(outcomes, BaseException) and len(outcomes) != len(batch):
                outcomes = RuntimeError(f"{self._name}: {len(outcomes)} outcomes for {len(batch)}")
            self.items += len(batch)
            self.commits += 1
            if len(self.batches) < 10_000:
                self.batches.append(len(batch))
            for i, w in enumerate(batch):
                if w.future.done():  # its caller gave up meanwhile
                    continue
                outcome = outcomes if isinstance(outcomes, BaseException) else outcomes[i]
                if isinstance(outcome, BaseException):
                    w.future.set_exception(outcome)
                else:
                    w.future.set_result(outcome)

    async def close(self) -> None:
        """Let the running commit finish (its items are answered), then stop the thread."""
        if self._runner is not None and not self._runner.done():
            await asyncio.gather(self._runner, return_exceptions=True)
        self._executor.shutdown(wait=True)
        if self.commits:
            log.info(
                "%s: %d items in %d commits (%.2f per commit)",
                self._name,
                self.items,
                self.commits,
                self.items / self.commits,
            )
