"""Receiving in batches (issue 12): several pending messages cost a few commits, not a few
each, and nothing about exactly-once changes.

Two inboxes on loopback (alice's A, bob's B); alice hands several messages to A, A's worker
delivers them in one pass, and bob's device takes them in one sync.  What is checked: every
message is filed exactly once, the inbox is told only after, the batch's commits on bob's
device database are a handful (one transaction for the batch, which also removes what the
previous batch filed), the removals, the inbox's deletions and the outbox's marks ride
later commits without losing or duplicating anything across a crash, a message that cannot
be filed now stays queued without holding back the rest, and a filing row left *handed* by
an interrupted batch is looked up in the mailbox instead of filed again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from onionpost.base.aio import foreground
from onionpost.base.clock import FakeClock
from onionpost.core.errors import (
    DatabaseFailed,
    FilingDeferred,
    PeerUnreachable,
    UnknownMailbox,
)
from onionpost.core.wire import ASK_BATCHES_AGAIN_AFTER, BATCH_ENVELOPES, BATCHED_ENVELOPE_MAX
from onionpost.device.filing import FILING_HEADER, Filer
from onionpost.device.submission import HAND_OVERS_AT_ONCE
from onionpost.device.sync import BATCH_MESSAGES, OPEN_AHEAD, _batches
from onionpost.inbox import api
from onionpost.net.client import InboxClient
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.filing import HANDED, FilingStore
from onionpost.store.outbox import OutboxRow
from onionpost.testing.harness import AliceAndBob, DeviceNode, compose
from onionpost.testing.harness import subjects as filed_subjects
from onionpost.testing.mailstore import MemorySink


def subjects(d: DeviceNode, folder: str = "INBOX") -> list[str]:
    return sorted(filed_subjects(d, folder))


class Commits:
    """COMMITs on one database (its connection's trace callback)."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        self.db = db
        db.conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        if sql.startswith("COMMIT"):
            self.count += 1

    def stop(self) -> int:
        self.db.conn.set_trace_callback(None)
        return self.count


class CommitModes:
    """The fsync mode of each COMMIT on one database: "FULL" (durable) or "NORMAL"."""

    def __init__(self, db: Database) -> None:
        self.modes: list[str] = []
        self._mode = "FULL"
        self.db = db
        db.conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        if sql.startswith("PRAGMA synchronous="):
            self._mode = sql.removeprefix("PRAGMA synchronous=")
        elif sql.startswith("COMMIT"):
            self.modes.append(self._mode)

    def stop(self) -> list[str]:
        self.db.conn.set_trace_callback(None)
        return self.modes


class World(AliceAndBob):
    async def hand_over(self, n: int, prefix: str = "mail") -> None:
        for i in range(n):
            self.alice.submissions.submit(
                self.alice.user,
                [self.bob.address],
                compose(self.alice, self.bob, f"{prefix} {i}"),
            )
        await self.alice.submissions.process_due()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


def pending_at_b(w: World) -> int:
    mailbox_id = w.bob.device.account.mailbox_id
    return w.b.inbox.store.spooled(mailbox_id)[0]


async def test_a_burst_is_taken_in_one_batch_with_few_commits(world: World) -> None:
    await world.hand_over(1, "first")  # the first contact (proof of work), alone
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1

    await world.hand_over(10)
    await world.a.worker.run_due()  # one pass: all ten reach B, marked in one commit
    assert pending_at_b(world) == 10
    commits = Commits(world.bob.db)
    assert await world.bob.device.sync() == 10
    n = commits.stop()
    # One transaction for the ten (opened, contacts, seen ids, filing rows already marked
    # handed, and the removal of what the first sync filed): not 5 per message.
    assert n == 1, n
    assert subjects(world.bob) == ["first 0"] + [f"mail {i}" for i in range(10)]
    assert pending_at_b(world) == 0  # acknowledged after filing
    assert world.bob.filer.store.count() == 0

    assert await world.bob.device.sync() == 0  # nothing twice
    assert len(world.bob.filed()) == 11


async def test_removals_and_acknowledgements_ride_the_next_commit(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sync costs bob's device one commit: the removal of the rows the previous sync
    put in the mailbox rides it.  Inbox B's deletion of the copies bob acknowledged rides
    the next delivery's commit: no commit of its own (issue 12, <= 4 commits a message)."""
    monkeypatch.setattr(api, "ACK_WAIT", 3600.0)  # no quiet-time flush during the test
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1
    store, inbox = world.bob.filer.store, world.b.inbox.store
    accepts = 0
    batches = world.b.server._accepts
    accept_many = batches._run_many

    def counted(batch):  # type: ignore[no-untyped-def]
        nonlocal accepts
        accepts += 1
        return accept_many(batch)

    monkeypatch.setattr(batches, "_run_many", counted)
    for r in range(3):
        # What the last sync filed is hidden, its rows still in the database; the copies it
        # acknowledged are hidden from bob and still stored at B.
        assert store.count() == 0 and len(store.filed_waiting()) >= 1
        assert world.bob.db.scalar("SELECT count(*) FROM filing_queue") >= 1
        assert pending_at_b(world) == 0 and inbox.acks_waiting() >= 1
        assert await world.bob.device.session.pending() == []
        await world.hand_over(3, f"round {r}")
        inbox_commits = Commits(inbox.db)
        accepts = 0
        await world.a.worker.run_due()
        # A's outbox and B's deliveries share the loop's databases: count B's commits only
        # against B's delivery batches, which carried the acknowledgements' deletion.
        assert inbox_commits.stop() == accepts
        assert inbox.acks_waiting() == 0
        assert world.b.db.scalar("SELECT count(*) FROM spool") == 3
        device_commits = Commits(world.bob.db)
        assert await world.bob.device.sync() == 3
        assert device_commits.stop() == 1
        assert world.bob.db.scalar("SELECT count(*) FROM filing_queue") == 3  # this batch's
    assert subjects(world.bob) == sorted(
        ["first 0"] + [f"round {r} {i}" for r in range(3) for i in range(3)]
    )


async def test_a_crash_before_the_removals_commit_loses_and_duplicates_nothing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node dies after the mailbox took a batch and bob acknowledged it, before the next
    commit carried the removal and the deletion (both only in memory): after the restart
    the handed rows are looked up, not filed again, and the copies B offers again are
    recognised and acknowledged without filing them twice."""
    monkeypatch.setattr(api, "ACK_WAIT", 3600.0)
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1
    await world.hand_over(4)
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 4
    assert len(world.bob.filer.store.filed_waiting()) == 4
    # The crash: what waited in memory is gone, the rows and the copies are still stored.
    world.bob.filer.store._filed.clear()
    world.b.inbox.store._acked.clear()
    world.bob.filer._fresh.clear()
    assert world.bob.filer.store.count() == 4
    assert pending_at_b(world) == 4
    holds = world.bob.sink.holds
    lookups: list[str] = []

    async def counted_holds(user, folder, header, value, *, from_uid=1):  # type: ignore[no-untyped-def]
        lookups.append(value)
        return await holds(user, folder, header, value, from_uid=from_uid)

    monkeypatch.setattr(world.bob.sink, "holds", counted_holds)
    # Offered again: each is recognised by its message id (seen) and acknowledged; the
    # handed rows are looked up in the mailbox, found, and removed.
    assert await world.bob.device.sync() == 4
    await world.bob.file_due()
    world.bob.filer.store.flush_filed()
    world.b.inbox.store.flush_acks()
    assert len(lookups) == 4
    assert world.bob.db.scalar("SELECT count(*) FROM filing_queue") == 0
    assert pending_at_b(world) == 0 and world.b.db.scalar("SELECT count(*) FROM spool") == 0
    delivered = [
        str(message_from_bytes(m, policy=default)["Subject"])
        for m in world.bob.sink.messages(world.bob.user)
    ]
    assert sorted(delivered) == ["first 0"] + [f"mail {i}" for i in range(4)]  # once each


async def test_delivered_marks_ride_the_next_hand_over(world: World) -> None:
    """A's worker marks what it delivered with the next hand-over's commit, or at the end of
    its run; a crash before either only sends the rows again, and B drops the repeats."""
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1
    outbox, worker = world.a.inbox.outbox, world.a.worker
    await world.hand_over(3, "run")
    ids = [r.id for r in outbox.due_rows(world.clock.now(), limit=10)]
    await worker.run_due()  # the marks of its passes commit at the run's end at the latest
    assert outbox.marks_waiting() == 0
    assert {outbox.get(i).state for i in ids} == {"delivered"}  # type: ignore[union-attr]

    # Mid-run: a row delivered (the peer said `accepted`), its mark waiting in memory.
    await world.hand_over(1, "carried")
    (row,) = outbox.due_rows(world.clock.now(), limit=10)
    assert await worker._attempt(row) == row.id
    outbox.mark_delivered_later([row.id], now=world.clock.now())
    assert outbox.due_rows(world.clock.now(), limit=10) == []  # the worker leaves it alone
    commits = Commits(world.a.db)
    await world.hand_over(1, "next")  # this hand-over's commit carries the mark
    assert commits.stop() == 1
    assert outbox.get(row.id).state == "delivered"  # type: ignore[union-attr]
    assert outbox.committed() == [row.id] and outbox.marks_waiting() == 0

    # The crash before a mark's commit: the row is still queued and goes out again.
    (row,) = outbox.due_rows(world.clock.now(), limit=10)
    assert await worker._attempt(row) == row.id
    outbox.mark_delivered_later([row.id], now=world.clock.now())
    outbox._marks.clear()  # what the crash forgets
    assert outbox.get(row.id).state == "queued"  # type: ignore[union-attr]
    assert await worker.run_due() == 1  # sent again: B answers "duplicate"
    assert outbox.get(row.id).state == "delivered"  # type: ignore[union-attr]
    assert await world.bob.device.sync() == 5
    assert await world.bob.device.sync() == 0
    assert subjects(world.bob) == sorted(
        ["first 0", "run 0", "run 1", "run 2", "carried 0", "next 0"]
    )


async def test_a_delivery_into_the_own_inbox_skips_its_fsync_and_a_peers_does_not(
    world: World,
) -> None:
    """alice's mail to carol (on alice's inbox A) is stored by A's own worker with a commit
    that skips its fsync; the row's delivered mark after it, on the same file, is durable
    (docs/queues.md, "Commits without an fsync").  alice's mail to bob is stored by B as a
    peer's delivery: durable, since A hears `accepted` after it."""
    carol = world.add_person(world.a, "carol")
    world.alice.submissions.submit(
        world.alice.user, [carol.address], compose(world.alice, carol, "to carol")
    )
    await world.alice.submissions.process_due()
    a = CommitModes(world.a.db)
    await world.a.worker.run_due()
    assert a.stop() == ["NORMAL", "FULL"]  # carol's delivery, then its delivered mark
    assert world.a.db.scalar("PRAGMA synchronous") == 2  # FULL again for everything else
    assert await carol.device.sync() == 1
    assert subjects(carol) == ["to carol"]

    await world.hand_over(1, "to bob")
    b = CommitModes(world.b.db)
    await world.a.worker.run_due()
    assert b.stop() == ["FULL"]
    assert await world.bob.device.sync() == 1


async def test_a_page_is_handed_over_several_at_a_time_unless_smtp_clients_are_served(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sealing job seals and hands over up to HAND_OVERS_AT_ONCE submissions at a time,
    so their hand-overs overlap (and share the inbox's commits); while SMTP clients are being
    served it goes one at a time, leaving the loop to them between two hand-overs."""
    subs = world.alice.submissions
    process = subs._process
    in_flight, most = 0, 0

    async def watched(*args):  # type: ignore[no-untyped-def]
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await process(*args)
        finally:
            in_flight -= 1

    monkeypatch.setattr(subs, "_process", watched)
    await world.hand_over(1, "first")  # the first contact: keys fetched, token granted
    most = 0
    await world.hand_over(8, "idle")
    assert 1 < most <= HAND_OVERS_AT_ONCE
    most = 0
    with foreground.busy():  # an SMTP client's transaction stays in flight
        await world.hand_over(3, "busy")
    assert most == 1
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 12
    assert subjects(world.bob) == sorted(
        ["first 0", *(f"idle {i}" for i in range(8)), *(f"busy {i}" for i in range(3))]
    )
    assert world.alice.submissions.store.due(world.clock.now()) == {}


def _watch_fetches(session, monkeypatch) -> tuple[list[int], list[list[int]]]:  # type: ignore[no-untyped-def]
    """The messages fetched one at a time, and the batches fetched, from now on."""
    singles: list[int] = []
    batches: list[list[int]] = []
    fetch, fetch_many = session.fetch, session.fetch_many

    async def one(message_id, sink, *, limit):  # type: ignore[no-untyped-def]
        singles.append(message_id)
        await fetch(message_id, sink, limit=limit)

    async def many(wanted, sink):  # type: ignore[no-untyped-def]
        batches.append([m.id for m in wanted])
        return await fetch_many(wanted, sink)

    monkeypatch.setattr(session, "fetch", one)
    monkeypatch.setattr(session, "fetch_many", many)
    return singles, batches


async def test_new_mail_comes_with_its_list(world: World, monkeypatch) -> None:
    """The answer listing what is pending carries the first batch (GET
    /v1/device/pending-mail): nothing is fetched after it; a batch beyond the first is
    fetched in one request."""
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    session = world.bob.device.session
    singles, batches = _watch_fetches(session, monkeypatch)
    assert await world.bob.device.sync() == 1
    await world.hand_over(20)
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 20
    assert singles == [] and [len(b) for b in batches] == [4]  # 16 came with the list
    assert session.pending_mail_served
    assert subjects(world.bob) == sorted(["first 0"] + [f"mail {i}" for i in range(20)])
    assert pending_at_b(world) == 0


async def _until(check: Any, what: str) -> None:
    for _ in range(300):
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_sync_loop_acknowledges_with_its_next_list(world: World, monkeypatch) -> None:
    """The device's sync loop sends no acknowledgement of its own: what one sync filed rides
    the next pending list's request (``ack``), so a new message costs the device one request
    to its inbox, not two.  A device that stops before asking again sends what it holds; one
    lost with a crash makes the inbox offer the message again, which the device acknowledges
    without filing it twice."""
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1
    session = world.bob.device.session
    acks: list[list[int]] = []
    carried: list[list[int]] = []
    stall = asyncio.Event()
    stalled = asyncio.Event()
    acknowledge, pending_mail = session.acknowledge, session.pending_mail

    async def counted_ack(ids: list[int]) -> int:
        acks.append(list(ids))
        return await acknowledge(ids)

    async def counted_list(**kw: Any) -> Any:
        if stall.is_set():  # the device is stopped before this list goes out
            stalled.set()
            await asyncio.Event().wait()
        carried.append(list(kw.get("ack", ())))
        return await pending_mail(**kw)

    monkeypatch.setattr(session, "acknowledge", counted_ack)
    monkeypatch.setattr(session, "pending_mail", counted_list)
    device = world.bob.device
    device.start()
    try:
        for i in range(3):
            await world.hand_over(1, f"new {i}")
            await world.a.worker.run_due()
            await _until(lambda i=i: len(subjects(world.bob)) == 2 + i, f"new {i} filed")
            await _until(lambda: pending_at_b(world) == 0, "its acknowledgement")
        assert acks == [] and [len(a) for a in carried if a] == [1, 1, 1]
        # stopped between a sync and the next list: the stop acknowledges
        stall.set()
        await world.hand_over(1, "last")
        await world.a.worker.run_due()
        await _until(stalled.is_set, "the list after 'last'")
        assert pending_at_b(world) == 1 and len(device.receiver._unacknowledged) == 1
    finally:
        await device.stop()
    assert len(acks) == 1 and pending_at_b(world) == 0
    # lost with a crash: offered again, acknowledged, not filed twice
    stall.clear()
    await world.hand_over(1, "crash")
    await world.a.worker.run_due()
    assert await world.bob.device.receiver.sync_once(ack_with_next=True) == 1
    assert pending_at_b(world) == 1
    device.receiver._unacknowledged.clear()  # the process died holding it
    assert await world.bob.device.sync() == 1  # taken again: recognised, acknowledged
    assert pending_at_b(world) == 0
    filed = subjects(world.bob)
    assert filed.count("crash 0") == 1 and filed.count("last 0") == 1 and len(filed) == 6


async def test_a_batch_is_fetched_in_one_request(world: World, monkeypatch) -> None:
    """From an inbox that lists pending mail without it (an older one), the ten messages of
    a batch come in one GET /v1/device/messages, not ten."""
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1
    await world.hand_over(10)
    await world.a.worker.run_due()
    session = world.bob.device.session
    session.pending_mail_served = False
    singles, batches = _watch_fetches(session, monkeypatch)
    assert await world.bob.device.sync() == 10
    assert singles == [] and len(batches) == 1 and len(batches[0]) == 10
    assert subjects(world.bob) == ["first 0"] + [f"mail {i}" for i in range(10)]
    assert pending_at_b(world) == 0


async def test_an_inbox_without_batches_is_fetched_from_one_at_a_time(
    world: World, monkeypatch
) -> None:
    """A batch answer that fails (an older inbox answers 404) falls back to one request
    per message, and every message is still filed once."""
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1
    await world.hand_over(5)
    await world.a.worker.run_due()

    async def refused(wanted, sink):  # type: ignore[no-untyped-def]
        sink(wanted[0].id).write(b"half an envelope")  # what was written is thrown away
        raise UnknownMailbox("no such route")

    monkeypatch.setattr(world.bob.device.session, "fetch_many", refused)
    world.bob.device.session.pending_mail_served = False  # an older inbox
    assert await world.bob.device.sync() == 5
    assert subjects(world.bob) == ["first 0"] + [f"mail {i}" for i in range(5)]
    assert pending_at_b(world) == 0
    assert await world.bob.device.sync() == 0


async def test_a_message_the_mailbox_refuses_now_does_not_hold_back_the_rest(
    world: World,
) -> None:
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    await world.bob.device.sync()

    sink = world.bob.sink
    original = sink.deliver
    refused: list[str] = []

    async def deliver_all_but_third(
        user: str, folder: str, message: Path | bytes, *, header: bytes, seen: bool = False
    ) -> None:
        data = message if isinstance(message, bytes) else message.read_bytes()
        if b"Subject: mail 2\n" in data.replace(b"\r\n", b"\n"):
            refused.append(header.decode())
            raise FilingDeferred("the mailbox is busy")
        await original(user, folder, message, header=header, seen=seen)

    sink.deliver = deliver_all_but_third  # type: ignore[method-assign]
    await world.hand_over(5)
    await world.a.worker.run_due()
    with pytest.raises(FilingDeferred):
        await world.bob.device.sync()
    assert refused
    delivered = sorted(
        str(message_from_bytes(m, policy=default)["Subject"])
        for m in world.bob.sink.messages(world.bob.user)
    )
    assert delivered == ["first 0", "mail 0", "mail 1", "mail 3", "mail 4"]
    assert pending_at_b(world) == 1  # only the unfiled one stays at the inbox
    assert world.bob.filer.store.count() == 1

    sink.deliver = original  # type: ignore[method-assign]
    world.clock.advance(3600)  # past the filing row's backoff
    assert await world.bob.device.sync() == 1
    delivered = sorted(
        str(message_from_bytes(m, policy=default)["Subject"])
        for m in world.bob.sink.messages(world.bob.user)
    )
    assert delivered == ["first 0"] + [f"mail {i}" for i in range(5)]
    assert pending_at_b(world) == 0


async def test_rows_left_handed_by_an_interrupted_batch_are_looked_up_not_refiled(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "device.db", DEVICE_COMPONENTS)
    try:
        store = FilingStore(db, tmp_path / "filing")
        sink = MemorySink()
        filer = Filer(store, clock=FakeClock(1_000), sink=sink)
        ids = []
        with db.transaction():
            for i in range(4):
                fid = filer.queue(
                    key=bytes([i]) * 16,
                    user="bob",
                    folder="INBOX",
                    message=f"Subject: {i}\r\n\r\nbody {i}\r\n".encode(),
                )
                assert fid is not None
                ids.append(fid)
        # The node died mid-batch: all four were marked handed, two reached the mailbox.
        store.set_states(ids, HANDED)
        for fid in ids[:2]:
            row = store.get(fid)
            assert row is not None
            header = f"{FILING_HEADER}: {row.key.hex()}\r\n".encode()
            await sink.deliver("bob", "INBOX", store.path(row.key), header=header)

        assert await filer.settle_many(ids) == set()
        bodies = sorted(m.split(b"\r\n\r\n", 1)[1] for m in sink.messages("bob"))
        assert bodies == [f"body {i}\r\n".encode() for i in range(4)]  # each exactly once
        assert store.count() == 0
        assert not list((tmp_path / "filing").glob("*.eml"))
    finally:
        db.close()


def test_batches_keep_order_and_bounds() -> None:
    from onionpost.net.client import PendingMessage

    items = [PendingMessage(i, 1000, 0) for i in range(BATCH_MESSAGES * 2 + 3)]
    cut = _batches(items)
    assert [p.id for b in cut for p in b] == list(range(len(items)))
    assert all(0 < len(b) <= BATCH_MESSAGES for b in cut)
    big = [PendingMessage(1, 5 << 20, 0), PendingMessage(2, 5 << 20, 0), PendingMessage(3, 1, 0)]
    assert [[p.id for p in b] for b in _batches(big)] == [[1], [2, 3]]
    assert _batches([]) == []


# -- a queue for one inbox goes in a few requests (POST /v1/deliveries) ------------------------


class Requests:
    """The delivery requests A's worker makes: ``deliver`` one envelope each, ``batches``
    the number of envelopes of each ``deliver_many``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.deliver = 0
        self.batches: list[int] = []
        single, several = InboxClient.deliver, InboxClient.deliver_many

        async def deliver(client: InboxClient, envelope: Any) -> Any:
            self.deliver += 1
            return await single(client, envelope)

        async def deliver_many(client: InboxClient, framed: Any, count: int) -> Any:
            self.batches.append(count)
            return await several(client, framed, count)

        monkeypatch.setattr(InboxClient, "deliver", deliver)
        monkeypatch.setattr(InboxClient, "deliver_many", deliver_many)


async def first_contact(world: World) -> None:
    """The first message (proof of work, a token for later) through, and filed."""
    await world.hand_over(1, "first")
    await world.a.worker.run_due()
    assert await world.bob.device.sync() == 1


def outbox_rows(world: World) -> list[OutboxRow]:
    """Every row of A's outbox, whatever its state."""
    return world.a.inbox.outbox.rows(states=("queued", "delivered", "bounced"))


def submit(world: World, subject: str, body_bytes: int) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"] = str(world.alice.address), str(world.bob.address)
    msg["Subject"], msg["Message-ID"] = subject, f"<{subject.replace(' ', '.')}@test>"
    msg.set_content("x" * body_bytes)
    world.alice.submissions.submit(world.alice.user, [world.bob.address], msg.as_bytes())


async def test_a_queue_for_one_inbox_goes_in_a_few_requests(world: World, monkeypatch) -> None:
    await first_contact(world)
    requests = Requests(monkeypatch)
    await world.hand_over(20)
    assert await world.a.worker.run_due() == 20
    assert requests.batches == [BATCH_ENVELOPES, 20 - BATCH_ENVELOPES]
    assert requests.deliver == 0
    assert {r.state for r in outbox_rows(world)} == {"delivered"}
    assert await world.bob.device.sync() == 20
    assert subjects(world.bob) == sorted(["first 0"] + [f"mail {i}" for i in range(20)])


async def test_a_large_envelope_goes_alone_beside_a_batch(world: World, monkeypatch) -> None:
    await first_contact(world)
    requests = Requests(monkeypatch)
    submit(world, "small one", 100)
    submit(world, "large", BATCHED_ENVELOPE_MAX + 10_000)
    submit(world, "small two", 100)
    await world.alice.submissions.process_due()
    assert await world.a.worker.run_due() == 3
    assert requests.batches == [2] and requests.deliver == 1
    assert await world.bob.device.sync() == 3
    assert subjects(world.bob) == ["first 0", "large", "small one", "small two"]


async def test_each_row_of_a_batch_gets_its_own_outcome(world: World, monkeypatch) -> None:
    """B refuses one envelope of a batch for now (bob's mailbox is too full for it): that
    row is deferred with B's words, the others are delivered, and it goes later."""
    await first_contact(world)
    b_store, bob_mailbox = world.b.inbox.store, world.bob.device.account.mailbox_id
    b_store.set_policy(bob_mailbox, accepts_strangers=True, pow_bits=None, quota_bytes=150_000)
    requests = Requests(monkeypatch)
    submit(world, "small one", 100)
    submit(world, "too big now", 200_000)
    submit(world, "small two", 100)
    await world.alice.submissions.process_due()
    assert await world.a.worker.run_due() == 3
    assert requests.batches == [3]
    (queued,) = [r for r in outbox_rows(world) if r.state == "queued"]
    assert queued.attempts == 1 and queued.last_error_code == "4.2.2"
    assert await world.bob.device.sync() == 2
    b_store.set_policy(bob_mailbox, accepts_strangers=True, pow_bits=None, quota_bytes=None)
    world.clock.advance(3600)
    assert await world.a.worker.run_due() == 1
    assert await world.bob.device.sync() == 1
    assert subjects(world.bob) == ["first 0", "small one", "small two", "too big now"]


async def test_a_batch_to_an_inbox_that_is_down_defers_every_row(world: World, monkeypatch) -> None:
    await first_contact(world)
    requests = Requests(monkeypatch)
    await world.b.stop()
    await world.hand_over(3)
    assert await world.a.worker.run_due() == 3
    waiting = [r for r in outbox_rows(world) if r.state == "queued"]
    assert len(waiting) == 3 and {r.attempts for r in waiting} == {1}
    assert requests.batches == [3]
    await world.b.start(worker=False)
    world.clock.advance(3600)
    assert await world.a.worker.run_due() == 3
    assert requests.batches == [3, 3] and requests.deliver == 0
    assert await world.bob.device.sync() == 3


async def test_an_inbox_that_takes_one_at_a_time_gets_one_at_a_time(
    world: World, monkeypatch
) -> None:
    """An older inbox answers 404 to ``POST /v1/deliveries``: the batch goes one request
    per envelope, and A sends that inbox no more batches for an hour; then it asks again."""
    await first_contact(world)

    async def no_route(server: api.InboxServer, request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    monkeypatch.setattr(api.InboxServer, "deliveries", no_route)
    await world.b.stop()
    await world.b.start(worker=False)  # its routes are bound anew, the batch one refusing
    requests = Requests(monkeypatch)
    await world.hand_over(4)
    assert await world.a.worker.run_due() == 4
    assert requests.batches == [4] and requests.deliver == 4
    await world.hand_over(3, "later")
    assert await world.a.worker.run_due() == 3
    assert requests.batches == [4] and requests.deliver == 7
    assert await world.bob.device.sync() == 7
    assert len(subjects(world.bob)) == 8
    # an hour on, B (upgraded meanwhile) is asked again, and takes the batch
    monkeypatch.undo()
    await world.b.stop()
    await world.b.start(worker=False)
    requests = Requests(monkeypatch)
    world.clock.advance(ASK_BATCHES_AGAIN_AFTER)
    await world.hand_over(3, "upgraded")
    assert await world.a.worker.run_due() == 3
    assert requests.batches == [3] and requests.deliver == 0
    assert await world.bob.device.sync() == 3


# -- a backlog: the next batch is fetched while one is filed -----------------------------------


async def backlog(world: World, n: int) -> None:
    """``n`` messages waiting at B for bob (beyond the first contact, filed)."""
    await first_contact(world)
    await world.hand_over(n)
    await world.a.worker.run_due()
    assert pending_at_b(world) == n


async def test_the_next_batch_is_fetched_while_one_is_filed(world: World, monkeypatch) -> None:
    """The first batch's filing waits until the second batch has been fetched: without
    the fetch ahead this sync would never finish."""
    await backlog(world, BATCH_MESSAGES + 4)
    session, filer = world.bob.device.session, world.bob.filer
    fetched_ahead = asyncio.Event()
    fetch_many, settle_many = session.fetch_many, filer.settle_many
    settled: list[int] = []

    async def fetching(wanted, sink):  # type: ignore[no-untyped-def]
        fetched_ahead.set()
        return await fetch_many(wanted, sink)

    async def settling(ids, **kw):  # type: ignore[no-untyped-def]
        if not settled:  # the first batch (carried by the pending list's answer)
            await asyncio.wait_for(fetched_ahead.wait(), 60)
        settled.append(len(ids))
        return await settle_many(ids, **kw)

    monkeypatch.setattr(session, "fetch_many", fetching)
    monkeypatch.setattr(filer, "settle_many", settling)
    assert await world.bob.device.sync() == BATCH_MESSAGES + 4
    assert settled == [BATCH_MESSAGES, 4]
    assert len(subjects(world.bob)) == BATCH_MESSAGES + 5
    assert pending_at_b(world) == 0


async def test_a_backlog_keeps_several_fetches_and_acknowledgements_on_their_way(
    world: World, monkeypatch
) -> None:
    """Over a slow link a backlog moves several batches per round trip: OPEN_AHEAD batches
    are fetched at once while the first is filed (each fetch here waits until all of them
    have started), and a batch's acknowledgement is still on its way while the next batch
    is filed (the first waits until the second has started).  Each message is filed once."""
    n = (OPEN_AHEAD + 1) * BATCH_MESSAGES + 4
    await backlog(world, n)
    session = world.bob.device.session
    fetch_many, acknowledge = session.fetch_many, session.acknowledge
    fetches_started, acks_started = asyncio.Event(), asyncio.Event()
    fetches: list[int] = []
    acks: list[int] = []

    async def fetching(wanted, sink):  # type: ignore[no-untyped-def]
        fetches.append(len(wanted))
        if len(fetches) == OPEN_AHEAD:
            fetches_started.set()
        await asyncio.wait_for(fetches_started.wait(), 60)
        return await fetch_many(wanted, sink)

    async def acknowledging(ids):  # type: ignore[no-untyped-def]
        acks.append(len(ids))
        if len(acks) == 2:
            acks_started.set()
        await asyncio.wait_for(acks_started.wait(), 60)
        return await acknowledge(ids)

    monkeypatch.setattr(session, "fetch_many", fetching)
    monkeypatch.setattr(session, "acknowledge", acknowledging)
    assert await world.bob.device.sync() == n
    assert fetches == [BATCH_MESSAGES] * OPEN_AHEAD + [4]  # the first came with the list
    assert acks == [BATCH_MESSAGES] * (OPEN_AHEAD + 1) + [4]
    assert len(subjects(world.bob)) == n + 1
    assert pending_at_b(world) == 0


async def test_a_batch_that_fails_leaves_the_ones_fetched_ahead_for_the_next_sync(
    world: World, monkeypatch
) -> None:
    """The second batch's filing fails: the sync stops there, the batches opened ahead are
    neither queued nor acknowledged (the first batch's acknowledgement may be on its way),
    and the next sync takes what is left, each message filed once."""
    n = (OPEN_AHEAD + 1) * BATCH_MESSAGES + 4
    await backlog(world, n)
    filer = world.bob.filer
    settle_many = filer.settle_many
    calls = 0

    async def failing(ids, **kw):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 2:
            raise DatabaseFailed("disk I/O error")
        return await settle_many(ids, **kw)

    monkeypatch.setattr(filer, "settle_many", failing)
    with pytest.raises(DatabaseFailed):
        await world.bob.device.sync()
    # the two batches are durably queued (the second waits in the filing queue); no more
    assert len(subjects(world.bob)) == 1 + 2 * BATCH_MESSAGES
    assert pending_at_b(world) in (n, n - BATCH_MESSAGES)
    monkeypatch.setattr(filer, "settle_many", settle_many)
    assert await world.bob.device.sync() in (n, n - BATCH_MESSAGES)
    assert subjects(world.bob) == sorted(["first 0"] + [f"mail {i}" for i in range(n)])
    assert pending_at_b(world) == 0
    assert await world.bob.device.sync() == 0


async def test_an_acknowledgement_that_fails_fails_the_sync_and_loses_nothing(
    world: World, monkeypatch
) -> None:
    """The acknowledgements fail (the link went down): the batches filed meanwhile stay
    filed, the sync fails once the failure is heard, and the next sync acknowledges them
    all without filing any twice."""
    n = 2 * BATCH_MESSAGES + 4
    await backlog(world, n)
    session = world.bob.device.session
    acknowledge = session.acknowledge

    async def lost(ids):  # type: ignore[no-untyped-def]
        raise PeerUnreachable("The connection to the inbox was lost.")

    monkeypatch.setattr(session, "acknowledge", lost)
    with pytest.raises(PeerUnreachable):
        await world.bob.device.sync()
    assert pending_at_b(world) == n
    monkeypatch.setattr(session, "acknowledge", acknowledge)
    assert await world.bob.device.sync() == n
    assert subjects(world.bob) == sorted(["first 0"] + [f"mail {i}" for i in range(n)])
    assert pending_at_b(world) == 0


async def test_large_envelopes_for_one_inbox_still_go_several_at_once(
    world: World, monkeypatch
) -> None:
    """Envelopes too large to share a request each take a delivery slot of their own, as
    before batching: the first one's request waits until the second's has started."""
    await first_contact(world)
    submit(world, "large one", BATCHED_ENVELOPE_MAX + 10_000)
    submit(world, "large two", BATCHED_ENVELOPE_MAX + 10_000)
    await world.alice.submissions.process_due()
    single = InboxClient.deliver
    second_started = asyncio.Event()
    started = 0

    async def deliver(client: InboxClient, envelope: Any) -> Any:
        nonlocal started
        started += 1
        if started == 1:
            await asyncio.wait_for(second_started.wait(), 60)
        else:
            second_started.set()
        return await single(client, envelope)

    monkeypatch.setattr(InboxClient, "deliver", deliver)
    assert await world.a.worker.run_due() == 2
    assert await world.bob.device.sync() == 2
    assert subjects(world.bob) == ["first 0", "large one", "large two"]
