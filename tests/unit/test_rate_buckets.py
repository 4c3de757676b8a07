"""The inbox's rate buckets (InboxStore.take_rates): all or nothing, one upsert per bucket."""

from __future__ import annotations

from pathlib import Path

from onionpost.store.db import Database
from onionpost.store.inbox import InboxStore, RateBucket

WINDOW = 3600


def _store(tmp_path: Path) -> InboxStore:
    return InboxStore(Database(tmp_path / "inbox.db", ("inbox",), record_key=b"k" * 32))


def _counts(store: InboxStore, *buckets: RateBucket) -> list[int]:
    return [store.rate_count(b.scope, b.key, WINDOW) for b in buckets]


def test_an_event_is_counted_in_every_bucket_until_one_is_full(tmp_path: Path) -> None:
    store = _store(tmp_path)
    token = RateBucket("token", b"t", 3)
    mailbox = RateBucket("mailbox", b"m", 2)
    assert store.take_rates([token, mailbox], WINDOW) is None
    assert store.take_rates([token, mailbox], WINDOW) is None
    assert _counts(store, token, mailbox) == [2, 2]
    # The mailbox's budget is spent: the token's is not charged for the refused event.
    assert store.take_rates([token, mailbox], WINDOW) == mailbox
    assert _counts(store, token, mailbox) == [2, 2]
    # The first bucket full: the second is not charged either.
    assert store.take_rates([mailbox, token], WINDOW) == mailbox
    assert _counts(store, token, mailbox) == [2, 2]
    # Another window starts empty.
    assert store.take_rates([token, mailbox], 2 * WINDOW) is None
    assert _counts(store, token, mailbox) == [2, 2]


def test_a_bucket_with_no_room_at_all_refuses_the_first_event(tmp_path: Path) -> None:
    store = _store(tmp_path)
    open_ = RateBucket("token", b"t", 5)
    closed = RateBucket("strangers", b"s", 0)
    assert store.take_rates([open_, closed], WINDOW) == closed
    assert _counts(store, open_, closed) == [0, 0]


def test_a_refusal_inside_a_batch_undoes_only_its_own_counting(tmp_path: Path) -> None:
    """In a group commit the buckets are charged inside the batch's transaction: a full
    bucket must roll back its own event's counting and nothing the batch did before."""
    store = _store(tmp_path)
    first = RateBucket("token", b"a", 1)
    other = RateBucket("token", b"b", 9)
    with store.db.transaction():
        assert store.take_rates([first], WINDOW) is None
        assert store.take_rates([other, first], WINDOW) == first
        assert store.take_rates([other], WINDOW) is None
    assert _counts(store, first, other) == [1, 1]
