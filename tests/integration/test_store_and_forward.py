"""Store-and-forward with an injected clock: days of retries in a second of real time.

The recipient's inbox goes away; mail waits in the sender's outbox across a restart of the
sender's node, and is delivered when the recipient comes back.  Mail whose lifetime runs out
bounces with a real RFC 3464 notification in the sender's INBOX, after a delay notice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from email import message_from_bytes
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from onionpost.core.errors import OnionpostError
from onionpost.device.submission import CHECK_AHEAD, FULL_CHECK_EVERY
from onionpost.testing.harness import AliceAndBob, compose, subjects

MINUTE = 60
HOUR = 3600
DAY = 86400


class World(AliceAndBob):
    async def send(self, subject: str) -> None:
        self.alice.submissions.submit(
            "alice", [self.bob.address], compose(self.alice, self.bob, subject)
        )
        await self.alice.submissions.process_due()

    async def tick(self, seconds: int) -> None:
        """Let fake time pass, then do what the scheduler would: deliver, seal, check."""
        self.clock.advance(seconds)
        await self.alice.submissions.process_due()
        await self.a.worker.run_due()

    async def restart_sender(self) -> None:
        """Stop alice's inbox and device, and build them again from their files."""
        await self.a.stop()
        self.a.close()
        await self.alice.close()
        self.a = self.reopen_inbox(self.a)
        await self.a.start(worker=False)
        self.alice = self.reopen_person(self.alice)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


async def test_mail_waits_for_an_offline_recipient_across_a_sender_restart(world: World) -> None:
    w = world
    await w.send("first contact")  # bob's keys are fetched and cached while he is online
    await w.a.worker.run_due()
    await w.bob.device.sync()
    assert subjects(w.bob, "INBOX") == ["first contact"]

    await w.b.stop()  # bob's inbox goes away
    await w.send("while you were out")  # sealed with bob's cached keys
    rows = w.a.inbox.outbox.rows()
    assert len(rows) == 1 and rows[0].attempts == 0
    for _ in range(18):  # three hours in ten-minute steps
        await w.tick(10 * MINUTE)
    (row,) = w.a.inbox.outbox.rows()
    assert row.attempts >= 5 and row.last_error and "offline" in row.last_error
    assert row.last_error_code.startswith("4.")

    await w.restart_sender()
    await w.b.start(worker=False)  # bob is back
    await w.tick(90 * MINUTE)  # backoff is capped at an hour, +-25 % jitter
    assert w.a.inbox.outbox.rows() == []  # delivered
    await w.bob.device.sync()
    assert subjects(w.bob, "INBOX") == ["first contact", "while you were out"]
    await w.alice.submissions.check_outbox(w.alice.device)
    assert subjects(w.alice, "INBOX") == []  # delivered within 4 hours: no notice


async def test_delay_notice_then_bounce_with_a_correct_dsn(world: World) -> None:
    w = world
    await w.send("hello")
    await w.a.worker.run_due()
    await w.b.stop()
    await w.send("never arrives")
    for _ in range(5):
        await w.tick(HOUR)
    await w.alice.submissions.check_outbox(w.alice.device)
    assert subjects(w.alice, "INBOX") == ["Delayed Mail (still being retried)"]

    while w.a.inbox.outbox.rows():
        await w.tick(2 * HOUR)
        assert w.clock.now() - (await _created(w)) < 6 * DAY
    await w.alice.submissions.check_outbox(w.alice.device)
    notices = subjects(w.alice, "INBOX")
    assert notices == ["Delayed Mail (still being retried)", "Undelivered Mail Returned to Sender"]
    bounce = message_from_bytes(w.alice.filed("INBOX")[-1], policy=default)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    human, status, headers = bounce.get_payload()
    assert str(w.bob.address) in human.get_content()
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    per_recipient = blocks[1]
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"].startswith("5.")
    assert per_recipient["Final-Recipient"] == f"rfc822; {w.bob.address}"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert "Subject: never arrives" in headers.get_payload()
    # checking again files nothing new
    await w.alice.submissions.check_outbox(w.alice.device)
    assert len(subjects(w.alice, "INBOX")) == 2


async def _created(w: World) -> int:
    rows = w.a.inbox.outbox.rows(states=("queued", "bounced"))
    return min(r.created_at for r in rows) if rows else w.clock.now()


async def test_first_contact_with_an_offline_recipient_waits_for_keys(world: World) -> None:
    w = world
    await w.b.stop()
    await w.send("keys please")
    (pending,) = w.alice.submissions.store.listing("alice")
    assert pending.state == "pending" and pending.last_error
    assert "cached" in pending.last_error
    await w.b.start(worker=False)
    await w.tick(2 * MINUTE)
    await w.a.worker.run_due()
    await w.bob.device.sync()
    assert subjects(w.bob, "INBOX") == ["keys please"]


async def test_outcome_checks_work_with_a_long_outbox_history(world: World) -> None:
    """A month of delivered mail in the outbox must not stop delay notices and bounces:
    the device asks only for the rows it waits on."""
    w = world
    await w.send("one")
    mailbox_id = w.alice.device.account.mailbox_id
    device_id = w.alice.device.account.device.device_id
    for i in range(3000):  # 30 days of history, about 1.3 MB if listed whole
        row = w.a.inbox.outbox.enqueue(
            mailbox_id=mailbox_id,
            device_id=device_id,
            onion=w.bob.address.onion,
            envelope=b"x",
            submission_key=f"history:{i}",
            now=w.clock.now(),
            expires_at=w.clock.now() + DAY,
        )
        w.a.inbox.outbox.mark_delivered(row, now=w.clock.now())
    await w.a.worker.run_due()
    await w.alice.submissions.check_outbox(w.alice.device)  # used to fail past 256 KiB
    assert w.alice.submissions.store.listing("alice") == []  # "one" is known to be delivered


async def test_an_outcome_check_writes_only_what_changed(world: World) -> None:
    """A check records a queued message's progress (attempts, last error, next try) only
    when that changed, so a long queue to an offline recipient is not rewritten row by row
    every minute."""
    w = world
    await w.send("hello")
    await w.a.worker.run_due()
    await w.b.stop()
    for i in range(3):
        await w.send(f"queued {i}")
    await w.tick(10 * MINUTE)
    await w.alice.submissions.check_outbox(w.alice.device)
    store = w.alice.submissions.store
    rows = {(r.submission_id, r.address): r for r in store.handed_over("alice")}
    assert len(rows) == 3
    for r in rows.values():  # the outbox's word is recorded
        assert r.outbox_id is not None
        queued = w.a.inbox.outbox.get(r.outbox_id)
        assert queued is not None and r.last_error and "offline" in r.last_error
        assert (r.attempts, r.next_attempt_at) == (queued.attempts, queued.next_attempt_at)
        assert r.attempts >= 1

    writes: list[str] = []
    db = w.alice.submissions.db
    db.conn.set_trace_callback(
        lambda sql: writes.append(sql) if sql.startswith("UPDATE submission_recipients") else None
    )
    try:
        await w.alice.submissions.check_outbox(w.alice.device)  # nothing new
        assert writes == []
        await w.tick(2 * HOUR)  # retried meanwhile: more attempts, a later next try
        await w.alice.submissions.check_outbox(w.alice.device)
        assert len(writes) == 3
    finally:
        db.conn.set_trace_callback(None)
    again = {(r.submission_id, r.address): r for r in store.handed_over("alice")}
    for key, r in again.items():
        assert r.attempts > rows[key].attempts


class Asked:
    """The outbox rows alice's outcome checks ask the inbox about."""

    def __init__(self, w: World, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids: list[int] = []
        session = w.alice.device.session
        outbox = session.outbox

        async def watched(**kw: Any) -> Any:
            self.ids += kw.get("ids") or []
            return await outbox(**kw)

        monkeypatch.setattr(session, "outbox", watched)

    def take(self) -> list[int]:
        ids, self.ids = sorted(self.ids), []
        return ids


async def test_an_outcome_check_asks_only_about_rows_whose_attempt_has_come(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outbox changes a row when it attempts it: between two attempts a check need not
    ask about it.  Every FULL_CHECK_EVERY a check asks about all of them (a row retried or
    cancelled from elsewhere), and ``queue retry`` makes a row's next check come at once."""
    w = world
    await w.send("hello")
    await w.a.worker.run_due()
    await w.b.stop()
    for i in range(4):
        await w.send(f"queued {i}")
    for _ in range(4):  # four attempts each, the next ones 6 to 10 minutes away
        await w.tick(10 * MINUTE)
    store = w.alice.submissions.store
    asked = Asked(w, monkeypatch)
    waited = sorted(r.outbox_id for r in store.handed_over("alice") if r.outbox_id)
    await w.alice.submissions.check_outbox(w.alice.device)  # the first check: all of them
    assert asked.take() == waited and len(waited) == 5  # "hello" learnt delivered now
    handed = sorted(r.outbox_id for r in store.handed_over("alice") if r.outbox_id)
    assert len(handed) == 4

    await w.alice.submissions.check_outbox(w.alice.device)
    soon = w.clock.now() + CHECK_AHEAD
    due = sorted(r.id for r in w.a.inbox.outbox.rows() if r.next_attempt_at <= soon)
    assert asked.take() == due and len(due) < 4

    one = handed[0]
    store.outbox_due_now(w.clock.now(), one)  # as `queue retry o<id>`
    await w.alice.submissions.check_outbox(w.alice.device)
    assert one in asked.take()

    w.clock.advance(FULL_CHECK_EVERY)
    await w.alice.submissions.check_outbox(w.alice.device)
    assert asked.take() == handed

    # a full check that could not reach the inbox is made again at the next check
    await w.a.stop()
    w.clock.advance(FULL_CHECK_EVERY)
    with pytest.raises(OnionpostError):
        await w.alice.submissions.check_outbox(w.alice.device)
    asked.take()
    await w.a.start(worker=False)
    w.clock.advance(60)
    await w.alice.submissions.check_outbox(w.alice.device)
    assert asked.take() == handed
