"""The SQLite connection every store module shares: durability settings, transactions, migrations.

Durability is the point of this module.  A message is acknowledged (SMTP 250, a peer's
``accepted``) only after the transaction that stores it has committed, and with WAL plus
``synchronous=FULL`` a commit is on disk when ``COMMIT`` returns, power loss included.

Schemas are versioned per *component* (``inbox``, ``outbox``, ``mailbox``, ``contacts`` ...):
each component owns ``migrations/<component>/NNNN_name.sql`` and its own version counter, so
parts of the program evolve their tables independently and an existing data directory is
upgraded in place on open.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import sqlite_utils

from onionpost.core.crypto.keys import record_hash
from onionpost.core.errors import DatabaseBusy, DatabaseFailed, StoreError

_MIGRATIONS_PACKAGE = "onionpost.store.migrations"
#: A migration with this line removes data that must not linger in freed pages: the database
#: is compacted (VACUUM) and its WAL emptied once the migrations are applied.
_COMPACT_MARK = "-- onionpost: compact after"
_CREATE_TABLE = re.compile(r"CREATE TABLE (?:IF NOT EXISTS )?(\w+)", re.IGNORECASE)


def translate(exc: sqlite3.Error) -> StoreError:
    """Turn a sqlite3 error into the one error type the rest of onionpost sees.

    Every way out of this module goes through here (queries, transactions, blobs), so no
    caller outside ``store/`` ever handles a ``sqlite3`` exception.  A lock held too long by
    another writer is :class:`DatabaseBusy`, so a caller can tell "wait and retry" from a
    database that is damaged or full.
    """
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
        return DatabaseBusy("The database is busy; try again in a moment.")
    if "disk" in text and ("full" in text or "I/O" in text):
        return DatabaseFailed(f"The database cannot be written: {text}. Free disk space and retry.")
    return DatabaseFailed(f"Database error: {text}")


class _NoRecordKey(Exception):
    """A keyed hash was asked of a database opened without the inbox's record key."""


class Database:
    """One SQLite file opened for onionpost: WAL, FULL sync, foreign keys, migrations applied.

    ``record_key`` (the inbox's :meth:`~onionpost.core.crypto.keys.ServerSecrets.record_key`) is
    what the inbox database's keyed hashes are made with: :meth:`record_hash` in Python and
    ``record_hash(value)`` in SQL (migrations use it to hash values stored in clear by older
    versions).  A database opened without it can still be read, and migrated while the
    tables to convert are empty, but nothing can be hashed.
    """

    def __init__(
        self,
        path: Path | str,
        components: Sequence[str],
        *,
        record_key: bytes | None = None,
        write_lock: threading.Lock | None = None,
    ) -> None:
        self.path = Path(path) if str(path) != ":memory:" else None
        self._record_key = record_key
        # Shared by the connections one process opens to the same file from different
        # threads (the node's loop and its group commit): a writer waiting for the other
        # sleeps on this lock and wakes the moment it is free, where SQLite's busy handler
        # would poll in steps of 1, 2, 5, 10... ms.  Never shared by two connections of one
        # thread (the second would wait for the first for ever).
        self._write_lock = write_lock
        #: Whether the connection's commits fsync (``synchronous=FULL``): always, except
        #: inside a ``transaction(durable=False)``.
        self._fsync_commits = True
        if self.path is not None:
            _create_private(self.path)
        try:
            self.conn = sqlite3.connect(
                str(path), isolation_level=None, timeout=10.0, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        try:
            self.conn.row_factory = sqlite3.Row
            self.conn.create_function("record_hash", 1, self._sql_record_hash, deterministic=True)
            if self.path is not None:
                self.conn.execute("PRAGMA journal_mode=WAL")
            self._set_fsync_commits(True)
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA busy_timeout=10000")
            self.utils = sqlite_utils.Database(self.conn)
            self._depth = 0
            for component in components:
                self.migrate(component)
        except BaseException as exc:
            # A database that cannot be opened (damaged, not ours, a failed migration) must
            # not leave its connection open behind the error.
            self.close()
            if isinstance(exc, sqlite3.Error):
                raise translate(exc) from exc
            raise

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    # -- keyed hashes ---------------------------------------------------------------------

    def record_hash(self, value: bytes | str) -> bytes:
        """The keyed hash stored instead of ``value`` (text is hashed as UTF-8)."""
        if self._record_key is None:
            raise StoreError(
                "The inbox database was opened without the inbox's key (inbox/server.key)."
            )
        data = value.encode("utf-8") if isinstance(value, str) else value
        return record_hash(self._record_key, data)

    def _sql_record_hash(self, value: object) -> bytes | None:
        if value is None:
            return None
        if self._record_key is None:
            raise _NoRecordKey
        if isinstance(value, bytes):
            return record_hash(self._record_key, value)
        return record_hash(self._record_key, str(value).encode("utf-8"))

    # -- transactions ---------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``; nested calls become savepoints.

        Writers take the write lock up front (IMMEDIATE) so two writers never deadlock on a
        lock upgrade.  When the block returns, the data is durably committed.  A ``sqlite3``
        error raised inside the block (the callers run SQL on the yielded connection) rolls
        back and leaves as a :class:`~onionpost.core.errors.StoreError` (see :func:`translate`).

        ``durable=False`` (outermost block only; a nested block is part of its outer one)
        commits without the fsync: ``synchronous=NORMAL`` for this one transaction.  The
        commit is atomic and visible at once, and survives the process being killed; only a
        power loss or kernel crash can undo it, and then only together with every later
        commit to this file (WAL replays a prefix of its commits).  So it is right for a
        transaction that nothing outside this file relies on until a later, durable commit
        to the same file has been made: see docs/queues.md, "Commits without an fsync".
        """
        name = f"sp{self._depth}"
        outermost = self._depth == 0
        lazy = outermost and not durable and self.path is not None
        locked = outermost and self._write_lock is not None
        if locked:
            assert self._write_lock is not None
            self._write_lock.acquire()
        try:
            try:
                if outermost and self._fsync_commits == lazy:
                    self._set_fsync_commits(not lazy)
                if outermost:
                    self.conn.execute("BEGIN IMMEDIATE")
                else:
                    self.conn.execute(f"SAVEPOINT {name}")
            except sqlite3.Error as exc:
                raise translate(exc) from exc
            self._depth += 1
            yield from self._body(name)
        finally:
            if lazy:
                # Back to FULL at once, for statements outside any transaction too.  Should
                # that fail, the next transaction sets it before its BEGIN.
                with contextlib.suppress(sqlite3.Error):
                    self._set_fsync_commits(True)
            if locked:
                assert self._write_lock is not None
                self._write_lock.release()

    @property
    def in_transaction(self) -> bool:
        """Whether a :meth:`transaction` block of this connection is open (a new one nests)."""
        return self._depth > 0

    def _set_fsync_commits(self, on: bool) -> None:
        self.conn.execute(f"PRAGMA synchronous={'FULL' if on else 'NORMAL'}")
        self._fsync_commits = on

    def _body(self, name: str) -> Iterator[sqlite3.Connection]:
        """The transaction once begun: yield, then commit (or roll back on an error)."""
        try:
            yield self.conn
        except BaseException as exc:
            self._depth -= 1
            with contextlib.suppress(sqlite3.Error):
                if self._depth == 0:
                    self.conn.execute("ROLLBACK")
                else:
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
            if isinstance(exc, sqlite3.Error):
                raise translate(exc) from exc
            raise
        else:
            self._depth -= 1
            try:
                if self._depth == 0:
                    self.conn.execute("COMMIT")
                else:
                    self.conn.execute(f"RELEASE {name}")
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    if self._depth == 0:
                        self.conn.execute("ROLLBACK")
                raise translate(exc) from exc

    def write(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        """One writing statement, atomic as :meth:`transaction` makes a block.

        Alone it is a transaction of its own (committed when this returns).  Inside a
        transaction it runs as it is, without a savepoint of its own: SQLite undoes a
        statement that fails as a whole, so a savepoint around a single statement would
        only cost two more statements (26 per delivered message on the receiving path).
        """
        if self._depth == 0:
            with self.transaction() as conn:
                return conn.execute(sql, params)
        return self.execute(sql, params)

    # -- queries --------------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.execute(sql, params).fetchone()
        return row

    def all(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        return list(self.execute(sql, params).fetchall())

    def scalar(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:  # noqa: ANN401
        row = self.one(sql, params)
        return None if row is None else row[0]

    # -- migrations -----------------------------------------------------------------------

    def schema_version(self, component: str) -> int:
        self.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " component TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL,"
            " applied_at INTEGER NOT NULL, PRIMARY KEY (component, version))"
        )
        v = self.scalar(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations WHERE component = ?",
            (component,),
        )
        return int(v)

    def migrate(self, component: str) -> int:
        """Apply every migration of ``component`` newer than the database's; return the version.

        Afterwards every table the component's schema declares must exist: a database file
        that was damaged, or belongs to something else, is reported here, not later as a
        confusing query error in the middle of a delivery.
        """
        current = self.schema_version(component)
        migrations = available_migrations(component)
        compact = False
        for version, name, sql in migrations:
            if version <= current:
                continue
            compact = compact or _COMPACT_MARK in sql
            with self.transaction() as conn:
                try:
                    for statement in _split_sql(sql):
                        conn.execute(statement)
                except sqlite3.Error as exc:
                    if self._record_key is None and "user-defined function" in str(exc):
                        raise StoreError(
                            f"Upgrading the {component} database to version {version} ({name})"
                            " needs the inbox's key (inbox/server.key) to hash what older"
                            " versions kept in clear; start the node (onionpost run) to"
                            " upgrade it."
                        ) from exc
                    raise StoreError(
                        f"Upgrading the {component} database to version {version} ({name}) "
                        f"failed: {exc}"
                    ) from exc
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?, ?)",
                    (component, version, name, int(time.time())),
                )
            current = version
        if compact and self.path is not None:
            self.compact()
        declared = {m.group(1) for _, _, sql in migrations for m in _CREATE_TABLE.finditer(sql)}
        missing = sorted(declared - set(self.utils.table_names()))
        if missing:
            where = self.path or "the in-memory database"
            raise StoreError(
                f"{where} is damaged or is not an onionpost database: the {component} tables "
                f"{', '.join(missing)} are missing. Restore it from a backup."
            )
        return current

    def compact(self) -> None:
        """Rewrite the database without free pages and empty its WAL, so that values a
        migration removed or replaced are not left behind in the file."""
        try:
            self.conn.execute("VACUUM")
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def count(self, table: str, where: str = "", params: Sequence[Any] = ()) -> int:
        """Rows in ``table`` (optionally matching ``where``), for status pages."""
        try:
            return int(self.utils[table].count_where(where or "1", params))
        except sqlite3.Error as exc:
            raise translate(exc) from exc


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite does (its -wal and -shm files inherit
    the database file's permissions); mail and keys must not be readable by others."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
    except OSError as exc:
        raise StoreError(f"Cannot create the database {path}: {exc.strerror}.") from exc


def available_migrations(component: str) -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` for every migration file of a component, in order."""
    folder = resources.files(_MIGRATIONS_PACKAGE).joinpath(component)
    found: list[tuple[int, str, str]] = []
    if not folder.is_dir():
        raise StoreError(f"No schema is defined for the '{component}' database component.")
    for entry in folder.iterdir():
        stem, _, ext = entry.name.partition(".")
        if ext != "sql":
            continue
        number, _, name = stem.partition("_")
        found.append((int(number), name, entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise StoreError(f"Migrations of '{component}' are not numbered 1..n: {versions}")
    return found


def _split_sql(sql: str) -> list[str]:
    """Split a migration script into statements (``executescript`` would commit on its own)."""
    statements: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                statements.append(buf.strip())
            buf = ""
    if buf.strip():
        statements.append(buf.strip())
    return statements


def snapshot(source: Path, target: Path) -> None:
    """A consistent copy of a database while others write to it (SQLite's online backup),
    created 0600; for ``onionpost backup``."""
    _create_private(target)
    try:
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30.0)
        try:
            dst = sqlite3.connect(str(target))
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise translate(exc) from exc
