"""The filing queue's spool file: bytes, a file by name or an open file, copied in pieces."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.filing import COPY_CHUNK, HANDED, FilingStore, MessageSource


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FilingStore]:
    db = Database(tmp_path / "device.db", DEVICE_COMPONENTS)
    try:
        yield FilingStore(db, tmp_path / "filing")
    finally:
        db.close()


class _Pieces:
    """A readable that records how much each read asked for."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)
        self.asked: list[int] = []

    def read(self, n: int, /) -> bytes:
        self.asked.append(n)
        return self._data.read(n)


def _add(store: FilingStore, key: bytes, message: MessageSource, prefix: bytes = b"") -> Path:
    with store.db.transaction():
        added = store.add(
            key=key, user="bob", folder="INBOX", message=message, prefix=prefix, now=1
        )
    assert added is not None
    return store.path(key)


def test_bytes_a_path_and_an_open_file_spool_the_same(store: FilingStore, tmp_path: Path) -> None:
    message = os.urandom(3 * COPY_CHUNK + 17)
    source = tmp_path / "message.eml"
    source.write_bytes(message)
    pieces = _Pieces(message)
    assert _add(store, b"a" * 16, message).read_bytes() == message
    assert _add(store, b"b" * 16, source).read_bytes() == message
    assert _add(store, b"c" * 16, pieces).read_bytes() == message
    assert max(pieces.asked) == COPY_CHUNK  # never asked for the whole message
    assert store.count("bob") == 3


def test_a_prefix_goes_first_and_an_open_file_is_read_from_where_it_stands(
    store: FilingStore,
) -> None:
    f = io.BytesIO(b"Subject: old\r\n\r\nthe body\r\n")
    f.seek(len(b"Subject: old\r\n"))
    spooled = _add(store, b"d" * 16, f, prefix=b"Subject: new\r\n").read_bytes()
    assert spooled == b"Subject: new\r\n\r\nthe body\r\n"


def test_a_key_queued_before_writes_nothing(store: FilingStore) -> None:
    _add(store, b"e" * 16, b"first")
    with store.db.transaction():
        assert store.add(key=b"e" * 16, user="bob", folder="INBOX", message=b"x", now=1) is None
    assert store.path(b"e" * 16).read_bytes() == b"first"


def test_a_filing_kept_in_the_database_has_no_spool_file_until_it_is_filed(
    store: FilingStore,
) -> None:
    """A submission's copy lives in filing_bodies (durable with the caller's COMMIT); the
    filer hands its bytes to the mailbox, and a scratch file left by an older version goes
    with the row."""
    message = b"Subject: kept\r\n\r\n" + os.urandom(70_000)
    with store.db.transaction():
        row_id = store.add(
            key=b"d" * 16, user="bob", folder="Sent", message=message, now=1, in_database=True
        )
    assert row_id is not None
    assert not store.path(b"d" * 16).exists()
    filing = store.get(row_id)
    assert filing is not None and store.body(filing) == message
    store.path(b"d" * 16).parent.mkdir(parents=True, exist_ok=True)
    store.path(b"d" * 16).write_bytes(b"a torn scratch copy from before a crash")
    scratch = store.path(b"d" * 16)
    assert store.remove_orphans() == 0  # the scratch file has its row
    store.done(filing)
    assert not scratch.exists()
    assert store.db.count("filing_bodies") == 0  # the body went with the row

    with pytest.raises(TypeError, match="bytes"):
        store.add(
            key=b"e" * 16, user="bob", folder="Sent", message=io.BytesIO(b"x"), now=1,
            in_database=True,
        )  # fmt: skip
    # A spooled filing has no body in the database.
    _add(store, b"f" * 16, b"spooled")
    spooled = store.due(10)[-1]
    assert store.body(spooled) is None


def _many(store: FilingStore, n: int) -> list[int | None]:
    """``n`` one-byte filings kept in the database, in one transaction; their row ids."""
    with store.db.transaction():
        return [
            store.add(
                key=i.to_bytes(16, "big"),
                user="bob",
                folder="INBOX",
                message=b"m",
                now=1,
                in_database=True,
            )
            for i in range(n)
        ]


def test_rows_are_marked_and_removed_many_at_a_time(store: FilingStore) -> None:
    """set_states takes any number of rows (one statement per 500 ids)."""
    ids = _many(store, 1203)
    assert None not in ids
    some = [i for i in ids if i is not None]
    store.set_states(some[:1100], HANDED)
    assert store.db.scalar("SELECT COUNT(*) FROM filing_queue WHERE state = ?", (HANDED,)) == 1100
    store.done_many(store.get_many(some[1:]))
    assert [f.id for f in store.get_many(some)] == some[:1]
    assert store.db.count("filing_bodies") == 1


def test_a_key_queued_before_in_the_database_keeps_its_first_body(store: FilingStore) -> None:
    with store.db.transaction():
        first, again = (
            store.add(
                key=b"k" * 16, user="bob", folder="Sent", message=body, now=1, in_database=True
            )
            for body in (b"one", b"two")
        )
    assert first is not None and again is None
    filing = store.get(first)
    assert filing is not None and store.body(filing) == b"one"
    assert store.db.count("filing_queue") == 1 and store.db.count("filing_bodies") == 1


def test_filed_rows_are_forgotten_many_at_a_time(store: FilingStore) -> None:
    """forget_filed removes any number of rows (several per statement), each by its id
    and its key; a row with a reused id under another key stays."""
    ids = _many(store, 601)
    filed = store.get_many([i for i in ids if i is not None])
    assert len(filed) == 601
    store.filed_later(filed, now=2)
    impostor = dataclasses.replace(filed[7], key=b"x" * 16)
    with store.db.transaction():
        store.forget_filed([*filed[:7], impostor, *filed[8:]])
    store.forgotten(filed)
    assert [f.id for f in store.get_many([f.id for f in filed])] == [filed[7].id]
    assert store.db.count("filing_bodies") == 1


def test_a_stale_list_of_filed_rows_removes_nothing_queued_since(store: FilingStore) -> None:
    """Row ids are reused (no AUTOINCREMENT): a list of filed rows taken before another step
    removed them, and new mail took their ids, must not remove the new mail (a change that
    moved COMMITs off the event loop lost mail this way; docs/performance.md)."""
    _add(store, b"a" * 16, b"first")
    first = store.due(10)
    store.filed_later(first, now=2)
    stale = store.filed_waiting()
    assert store.flush_filed() == 1  # another step removes it meanwhile
    _add(store, b"b" * 16, b"second")  # new mail takes the freed id
    second = store.due(10)
    assert [f.id for f in second] == [f.id for f in first]
    store.filed_later(second, now=3)
    with store.db.transaction():
        store.forget_filed(stale)
    store.forgotten(stale)
    assert store.db.count("filing_queue") == 1  # the new row is still there...
    assert store.filed_waiting() == second  # ...and still waits for its own removal
    assert store.path(b"b" * 16).exists()
    store.done_many(stale)
    store.done(first[0])
    assert store.db.count("filing_queue") == 1
