"""onionpost.base.groupcommit: every caller hears its outcome only after the commit holding its
item returned, batches are what queued meanwhile, a lone item is not held back, and a failed
item or batch reaches exactly its callers.  A fake committer records the order of events; no
timing is asserted (the committer is held with events, not sleeps)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from onionpost.base.groupcommit import GroupCommit
from onionpost.core.errors import StoreError


class Recorder:
    """A committer that logs (event, items) and can be held inside a commit."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.fail_items: set[int] = set()
        self.fail_batch = False

    def commit(self, items: list[int]) -> list[int | BaseException]:
        with self.lock:
            self.log.append(("begin", tuple(items)))
        self.entered.set()
        self.hold.wait()
        with self.lock:
            self.log.append(("durable", tuple(items)))
        if self.fail_batch:
            raise StoreError("The disk is full.")
        return [StoreError(f"item {i} refused") if i in self.fail_items else i * 10 for i in items]


async def _submit(group: GroupCommit[int, int], rec: Recorder, item: int) -> int:
    result = await group.submit(item)
    with rec.lock:
        rec.log.append(("acked", item))
    return result


def _batch_of(log: list[tuple[str, object]], item: int) -> tuple[int, ...]:
    for event, items in log:
        if event == "durable" and isinstance(items, tuple) and item in items:
            return items
    raise AssertionError(f"item {item} was never committed")


async def test_each_ack_follows_the_commit_that_holds_it_and_followers_share_one() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.commit)
    rec.hold.clear()
    first = asyncio.create_task(_submit(group, rec, 0))
    # The lone first item is committed at once, without waiting for company.
    await asyncio.to_thread(rec.entered.wait)
    assert rec.log == [("begin", (0,))]
    # These queue while the first commit runs: they become the next batch, together.
    rest = [asyncio.create_task(_submit(group, rec, i)) for i in range(1, 20)]
    await asyncio.sleep(0)
    rec.hold.set()
    results = await asyncio.gather(first, *rest)
    await group.close()

    assert results == [i * 10 for i in range(20)]
    assert group.batches == [1, 19]
    assert [e for e in rec.log if e[0] == "begin"] == [
        ("begin", (0,)),
        ("begin", tuple(range(1, 20))),
    ]
    for i in range(20):
        durable = rec.log.index(("durable", _batch_of(rec.log, i)))
        assert rec.log.index(("acked", i)) > durable
    # One commit at a time: the second began after the first was durable.
    assert rec.log.index(("begin", tuple(range(1, 20)))) > rec.log.index(("durable", (0,)))


async def test_many_concurrent_submissions_all_committed_once_in_order() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.commit)
    results = await asyncio.gather(*(_submit(group, rec, i) for i in range(500)))
    await group.close()
    assert results == [i * 10 for i in range(500)]
    committed = [i for e, items in rec.log if e == "durable" for i in items]  # type: ignore[union-attr]
    assert committed == list(range(500))
    assert sum(group.batches) == 500
    for i in range(500):
        assert rec.log.index(("acked", i)) > rec.log.index(("durable", _batch_of(rec.log, i)))


async def test_a_refused_item_fails_alone_and_a_failed_commit_fails_its_whole_batch() -> None:
    rec = Recorder()
    rec.fail_items = {3}
    group: GroupCommit[int, int] = GroupCommit(rec.commit)
    outcomes = await asyncio.gather(
        *(_submit(group, rec, i) for i in range(6)), return_exceptions=True
    )
    assert isinstance(outcomes[3], StoreError)
    assert [o for i, o in enumerate(outcomes) if i != 3] == [0, 10, 20, 40, 50]

    rec.fail_batch = True
    with pytest.raises(StoreError, match="disk is full"):
        await group.submit(7)
    assert ("acked", 7) not in rec.log
    # The group recovers: the next commit is a new batch.
    rec.fail_batch = False
    assert await group.submit(8) == 80
    await group.close()


async def test_a_caller_that_gives_up_does_not_stop_the_commit() -> None:
    rec = Recorder()
    group: GroupCommit[int, int] = GroupCommit(rec.commit)
    rec.hold.clear()
    gone = asyncio.create_task(group.submit(1))
    await asyncio.to_thread(rec.entered.wait)
    stays = asyncio.create_task(group.submit(2))
    gone.cancel()
    rec.hold.set()
    assert await stays == 20
    await group.close()
    assert gone.cancelled()
    assert ("durable", (1,)) in rec.log and ("durable", (2,)) in rec.log
