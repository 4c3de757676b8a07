"""The store boundary (onionpost/store/db.py): no sqlite3 exception leaves it, and a rollback
undoes the whole block."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from onionpost.core.errors import DatabaseBusy, DatabaseFailed, OnionpostError, StoreError
from onionpost.store.db import Database, translate


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = Database(tmp_path / "t.sqlite", [])
    d.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL UNIQUE)")
    yield d
    d.close()


# (sqlite3 error, the StoreError it becomes, words in its sentence)
TRANSLATIONS: list[tuple[sqlite3.Error, type[StoreError], str]] = [
    (sqlite3.OperationalError("database is locked"), DatabaseBusy, "busy"),
    (sqlite3.OperationalError("database table is locked"), DatabaseBusy, "busy"),
    (sqlite3.OperationalError("database or disk is full"), DatabaseFailed, "Free disk space"),
    (sqlite3.OperationalError("disk I/O error"), DatabaseFailed, "Free disk space"),
    (sqlite3.DatabaseError("file is not a database"), DatabaseFailed, "not a database"),
    (sqlite3.IntegrityError("UNIQUE constraint failed: t.v"), DatabaseFailed, "UNIQUE"),
]


@pytest.mark.parametrize(("raw", "kind", "words"), TRANSLATIONS)
def test_translate(raw: sqlite3.Error, kind: type[StoreError], words: str) -> None:
    err = translate(raw)
    assert type(err) is kind
    assert isinstance(err, OnionpostError)
    assert words in str(err)
    assert err.temporary  # as StoreError always was: the operation may succeed later


def test_an_error_inside_a_transaction_is_a_store_error_and_rolls_back(db: Database) -> None:
    with db.transaction() as c:
        c.execute("INSERT INTO t (v) VALUES ('a')")
    with pytest.raises(DatabaseFailed, match="UNIQUE") as err, db.transaction() as c:
        c.execute("INSERT INTO t (v) VALUES ('b')")
        c.execute("INSERT INTO t (v) VALUES ('a')")  # raw sqlite3.IntegrityError
    assert isinstance(err.value.__cause__, sqlite3.IntegrityError)
    assert [r["v"] for r in db.all("SELECT v FROM t")] == ["a"]  # 'b' was rolled back
    with db.transaction() as c:  # and the connection is usable again
        c.execute("INSERT INTO t (v) VALUES ('c')")
    assert db.scalar("SELECT COUNT(*) FROM t") == 2


def test_an_error_in_a_nested_transaction_rolls_back_the_savepoint_only(db: Database) -> None:
    with db.transaction() as outer:
        outer.execute("INSERT INTO t (v) VALUES ('kept')")
        with pytest.raises(StoreError), db.transaction() as inner:
            inner.execute("INSERT INTO t (v) VALUES ('dropped')")
            inner.execute("SELECT * FROM no_such_table")
    assert [r["v"] for r in db.all("SELECT v FROM t")] == ["kept"]


def test_a_single_write_is_atomic_alone_and_inside_a_transaction(db: Database) -> None:
    """Database.write: alone, its own transaction; nested, no savepoint of its own, yet a
    statement that fails leaves none of its rows (SQLite undoes the statement whole) and
    the enclosing transaction carries on."""
    db.write("INSERT INTO t (v) VALUES ('a')")
    assert db.scalar("SELECT COUNT(*) FROM t") == 1  # committed on its own
    statements: list[str] = []
    db.conn.set_trace_callback(statements.append)
    with db.transaction():
        db.write("INSERT INTO t (v) VALUES ('b')")
        with pytest.raises(DatabaseFailed, match="UNIQUE"):
            # 'c' would go in first, then 'a' fails: the statement is undone as a whole
            db.write("INSERT INTO t (v) SELECT 'c' UNION ALL SELECT 'a'")
        db.write("INSERT INTO t (v) VALUES ('d')")
    db.conn.set_trace_callback(None)
    assert not [s for s in statements if s.startswith(("SAVEPOINT", "RELEASE"))]
    assert sorted(r["v"] for r in db.all("SELECT v FROM t")) == ["a", "b", "d"]


def test_other_errors_pass_unchanged(db: Database) -> None:
    with pytest.raises(KeyError), db.transaction() as c:
        c.execute("INSERT INTO t (v) VALUES ('x')")
        raise KeyError("mine")
    assert db.scalar("SELECT COUNT(*) FROM t") == 0


def test_a_locked_database_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "busy.sqlite"
    holder = Database(path, [])
    holder.execute("CREATE TABLE t (v TEXT)")
    other = Database(path, [])
    other.execute("PRAGMA busy_timeout=0")
    try:
        with holder.transaction() as c:
            c.execute("INSERT INTO t VALUES ('x')")
            with pytest.raises(DatabaseBusy), other.transaction() as c2:
                c2.execute("INSERT INTO t VALUES ('y')")
    finally:
        other.close()
        holder.close()


def test_queries_outside_transactions_are_translated(db: Database) -> None:
    with pytest.raises(DatabaseFailed, match="no such table"):
        db.all("SELECT * FROM missing_table")


def _synchronous(db: Database) -> int:
    return int(db.scalar("PRAGMA synchronous"))  # 1 NORMAL, 2 FULL


def test_a_transaction_that_need_not_be_durable_commits_without_fsync(db: Database) -> None:
    """``durable=False`` is ``synchronous=NORMAL`` for that one transaction: FULL before and
    after it, after a rollback too, and a nested block follows its outer one."""
    assert _synchronous(db) == 2
    seen: list[str] = []
    db.conn.set_trace_callback(seen.append)
    with db.transaction(durable=False) as c:
        c.execute("INSERT INTO t (v) VALUES ('lazy')")
    assert seen[:4] == ["PRAGMA synchronous=NORMAL", "BEGIN IMMEDIATE", seen[2], "COMMIT"]
    assert _synchronous(db) == 2
    with pytest.raises(DatabaseFailed), db.transaction(durable=False) as c:
        c.execute("INSERT INTO t (v) VALUES ('lazy')")  # UNIQUE: rolled back
    assert _synchronous(db) == 2
    seen.clear()
    with db.transaction() as c, db.transaction(durable=False):
        c.execute("INSERT INTO t (v) VALUES ('inner')")
    assert not any(s.startswith("PRAGMA synchronous") for s in seen)
    db.conn.set_trace_callback(None)
    assert [r["v"] for r in db.all("SELECT v FROM t ORDER BY k")] == ["lazy", "inner"]


def test_a_database_in_memory_ignores_durable_false() -> None:
    """No WAL, no prefix rule: such a database is never asked to skip an fsync."""
    d = Database(":memory:", [])
    seen: list[str] = []
    d.conn.set_trace_callback(seen.append)
    with d.transaction(durable=False) as c:
        c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
    assert not any(s.startswith("PRAGMA") for s in seen)
    d.close()
