"""The running node's queue counts (``store.queue.counts``, SQL aggregates, written into its
status file every few seconds) agree with what ``onionpost queue`` lists
(``summary(waiting(...))``), on a machine with both roles and on a gateway-only one."""

from __future__ import annotations

from pathlib import Path

from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.outbox import OutboxStore
from onionpost.store.queue import counts, summary, waiting
from onionpost.store.submissions import SubmissionStore

NOW = 1_800_000_000
MAILBOX = b"m" * 16


def test_counts_agree_with_the_listing(tmp_path: Path) -> None:
    subs = SubmissionStore(Database(tmp_path / "device.db", DEVICE_COMPONENTS))
    outbox = OutboxStore(Database(tmp_path / "inbox.db", INBOX_COMPONENTS, record_key=b"k" * 32))
    users = {MAILBOX: "alice"}
    assert counts(subs, outbox) == summary(waiting(subs, outbox, users))
    assert counts(subs, outbox)["total"] == 0
    ids = [
        subs.add(
            user="alice",
            message=b"x",
            headers=b"Subject: s\r\n",
            recipients=[f"r{i}a@x.onion", f"r{i}b@x.onion"],
            message_ref="",
            now=NOW,
            expires_at=NOW + 86_400,
        )
        for i in range(4)
    ]
    rows = [
        outbox.enqueue(
            mailbox_id=MAILBOX,
            device_id=b"d" * 16,
            onion="a" * 56,
            envelope=b"sealed",
            submission_key=f"k{i}",
            now=NOW,
            expires_at=NOW + 86_400,
        )
        for i in range(5)
    ]
    for i, row in enumerate(rows[:3]):
        subs.mark_queued(ids[i], f"r{i}a@x.onion", row)
    outbox.mark_deferred(rows[0], now=NOW, next_attempt_at=NOW + 60, error="no", code="4.4.1")
    outbox.mark_deferred(rows[3], now=NOW, next_attempt_at=NOW + 60, error="no", code="4.4.1")
    outbox.mark_delivered(rows[1], now=NOW)
    subs.mark_delivered(ids[1], "r1b@x.onion")  # mail to oneself, filed here
    outbox.cancel(rows[4], now=NOW)
    subs.cancel(ids[3])
    for sub_store, box in ((subs, outbox), (subs, None), (None, outbox)):
        listed = summary(waiting(sub_store, box, users))
        assert counts(sub_store, box) == listed, (sub_store, box)
    both = counts(subs, outbox)
    assert (both["waiting for keys"], both["queued"], both["deferred"]) == (2, 1, 2), both
    gateway = counts(subs, None)
    assert gateway["at the inbox"] == 3 and gateway["total"] == 5, gateway
