"""onionpost.store.db.Database.transact: the body runs on the loop, the COMMIT in the
database's commit thread, and meanwhile the connection belongs to that thread alone: another
transaction waits its turn, a use from another thread waits for the COMMIT, and a caller hears
success only once the commit returned.  The commit thread is held with an event (a job queued
before the COMMIT on its one worker), never with sleeps; no timing is asserted."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from onionpost.core.errors import StoreError
from onionpost.store.db import Database


class Traced:
    """A database with a table ``t`` and a log of (statement, thread) as SQLite runs them."""

    def __init__(self, path: Path, write_lock: threading.Lock | None = None) -> None:
        self.db = Database(path, [], write_lock=write_lock)
        self.db.execute(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT,"
            " p INTEGER REFERENCES t(id) DEFERRABLE INITIALLY DEFERRED)"
        )
        self.log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self.db.conn.set_trace_callback(self._trace)

    def _trace(self, statement: str) -> None:
        with self._lock:
            self.log.append(
                (statement.split(maxsplit=1)[0].upper(), threading.current_thread().name)
            )

    def rows(self) -> list[str]:
        """What another connection sees: only what is committed."""
        assert self.db.path is not None
        other = sqlite3.connect(str(self.db.path))
        try:
            return [r[0] for r in other.execute("SELECT v FROM t ORDER BY id")]
        finally:
            other.close()

    def hold(self) -> threading.Event:
        """Occupy the commit thread until the returned event is set."""
        release = threading.Event()
        assert self.db._committer is not None  # created by a first transact
        self.db._committer.submit(release.wait)
        return release


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[Traced]:
    t = Traced(tmp_path / "t.db")
    yield t
    t.db.close()


def insert(v: str) -> Callable[[sqlite3.Connection], str]:
    def body(c: sqlite3.Connection) -> str:
        c.execute("INSERT INTO t (v) VALUES (?)", (v,))
        return v

    return body


async def test_body_on_the_loop_commit_in_the_thread_durable_on_return(traced: Traced) -> None:
    main = threading.current_thread().name
    assert await traced.db.transact(insert("a")) == "a"
    assert traced.rows() == ["a"]
    ran = [(s, th) for s, th in traced.log if s in ("BEGIN", "INSERT", "COMMIT")]
    assert ran[0] == ("BEGIN", main) and ran[1] == ("INSERT", main)
    assert ran[2][0] == "COMMIT" and ran[2][1].startswith("db-commit")
    # The connection is back: the loop's own transactions and queries work as before.
    with traced.db.transaction() as c:
        c.execute("INSERT INTO t (v) VALUES ('b')")
    assert traced.db.scalar("SELECT count(*) FROM t") == 2


async def test_the_connection_is_lent_until_the_commit_returned(traced: Traced) -> None:
    await traced.db.transact(insert("warm"))
    release = traced.hold()
    events: list[str] = []

    def second(c: sqlite3.Connection) -> None:
        events.append("second body")
        c.execute("INSERT INTO t (v) VALUES ('second')")

    first = asyncio.create_task(traced.db.transact(insert("first")))
    while not any(s == "INSERT" and th == "MainThread" for s, th in traced.log[2:]):
        await asyncio.sleep(0)
    # The first body ran; its COMMIT waits behind the held job: the connection is lent.
    assert not traced.db._returned.is_set()
    assert traced.rows() == ["warm"]
    seen: list[int] = []
    reader_started = threading.Event()

    def read() -> None:
        reader_started.set()
        seen.append(int(traced.db.scalar("SELECT count(*) FROM t")))

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    reader_started.wait()
    later = asyncio.create_task(traced.db.transact(second))
    for _ in range(20):
        await asyncio.sleep(0)
    assert events == [] and not first.done()  # its turn comes after the first COMMIT
    release.set()
    assert await first == "first"
    await later
    reader.join()
    assert events == ["second body"]
    assert traced.rows() == ["warm", "first", "second"]
    # Nothing used the connection between the first body and its COMMIT: the reader's
    # query and the second BEGIN both come after that COMMIT.
    log = traced.log
    commit = next(
        i for i, (s, th) in enumerate(log) if s == "COMMIT" and th.startswith("db-commit") and i > 4
    )
    assert [s for s, th in log[:commit] if th == "reader"] == []
    assert seen and seen[0] >= 2
    assert all(th != "reader" or i > commit for i, (_s, th) in enumerate(log))


async def test_a_failing_body_rolls_back_and_returns_the_connection(traced: Traced) -> None:
    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t (v) VALUES ('lost')")
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        await traced.db.transact(bad)
    assert traced.rows() == []
    assert not any(s == "COMMIT" for s, _ in traced.log)
    assert await traced.db.transact(insert("next")) == "next"
    assert traced.rows() == ["next"]


async def test_a_failing_commit_is_raised_and_rolled_back(traced: Traced) -> None:
    def dangling(c: sqlite3.Connection) -> None:
        # A deferred foreign key: the statement passes, the COMMIT fails.
        c.execute("INSERT INTO t (v, p) VALUES ('dangling', 999)")

    with pytest.raises(StoreError):
        await traced.db.transact(dangling)
    assert traced.db._returned.is_set()
    assert traced.rows() == []
    assert await traced.db.transact(insert("ok")) == "ok"
    assert traced.rows() == ["ok"]


async def test_nested_transactions_in_the_body_are_savepoints(traced: Traced) -> None:
    def body(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO t (v) VALUES ('kept')")
        with pytest.raises(ValueError), traced.db.transaction() as inner:
            inner.execute("INSERT INTO t (v) VALUES ('undone')")
            raise ValueError
        traced.db.write("INSERT INTO t (v) VALUES ('also kept')")

    await traced.db.transact(body)
    assert traced.rows() == ["kept", "also kept"]
    assert [s for s, _ in traced.log].count("COMMIT") == 1


async def test_a_cancelled_caller_waits_for_its_commit(traced: Traced) -> None:
    await traced.db.transact(insert("warm"))
    release = traced.hold()
    task = asyncio.create_task(traced.db.transact(insert("gone")))
    while not any(s == "INSERT" and th == "MainThread" for s, th in traced.log[2:]):
        await asyncio.sleep(0)
    task.cancel()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()  # still waiting for the COMMIT it started
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert traced.db._returned.is_set()
    assert traced.rows() == ["warm", "gone"]  # stored, never acknowledged


async def test_the_write_lock_is_held_until_the_commit_returned(tmp_path: Path) -> None:
    lock = threading.Lock()
    traced = Traced(tmp_path / "t.db", write_lock=lock)
    try:
        await traced.db.transact(insert("warm"))
        assert not lock.locked()
        release = traced.hold()
        task = asyncio.create_task(traced.db.transact(insert("x")))
        while not any(s == "INSERT" and th == "MainThread" for s, th in traced.log[2:]):
            await asyncio.sleep(0)
        assert lock.locked()  # from BEGIN to the end of COMMIT, as a plain transaction
        release.set()
        await task
        assert not lock.locked()
    finally:
        traced.db.close()
