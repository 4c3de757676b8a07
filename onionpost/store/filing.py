"""The filing queue: mail on its way into the user's mailbox (Dovecot), durable meanwhile.

Everything onionpost files for a person (mail from others, copies of their own mail from
their other devices, the Sent copy of what a local client submitted, delivery notices,
bounces, device-list notices) is first written here: the message into a spool file under
``<data>/filing/`` (fsynced), then a row, in the caller's transaction.  The filer
(:mod:`onionpost.device.filing`) hands each row to Dovecot's LMTP and removes it after the 250.

Why a queue and not a direct LMTP call where mail arrives: the caller's other state (the
submission a client is about to hear 250 for, the message id that makes a second download
of the same message a replay) commits atomically with the row, and Dovecot being down or
restarting delays filing without losing anything.

The ``mailbox_seen_ids`` table (message ids already taken from the inbox, so a message
downloaded twice is filed once) lives here too: it is recorded in the same transaction as
the rows it produced.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from onionpost.base.atomicfile import write_all, write_atomic
from onionpost.core.crypto.envelope import Readable
from onionpost.core.errors import StoreError
from onionpost.store.db import Database

QUEUED, HANDED, FILED = 0, 1, 2

#: A message given as a file is copied into the spool in pieces of this size, never whole.
COPY_CHUNK = 1 << 20
#: (id, key) pairs per DELETE (SQLite bounds a statement's parameters).
_PAIRS_PER_STATEMENT = 250

#: What :meth:`FilingStore.add` files: the bytes, a file by name, or an open file (read from
#: where it stands to its end).
MessageSource = bytes | Path | Readable


@dataclass(frozen=True)
class Filing:
    id: int
    key: bytes
    user: str
    folder: str
    source: bytes | None
    mark_seen: bool
    unless_message_id: str | None
    not_before: int
    state: int
    attempts: int
    next_try_at: int
    last_error: str
    created_at: int = 0


def _filing(r: sqlite3.Row) -> Filing:
    return Filing(
        id=int(r["id"]),
        key=bytes(r["key"]),
        user=str(r["user"]),
        folder=str(r["folder"]),
        source=None if r["source"] is None else bytes(r["source"]),
        mark_seen=bool(r["mark_seen"]),
        unless_message_id=r["unless_message_id"],
        not_before=int(r["not_before"]),
        state=int(r["state"]),
        attempts=int(r["attempts"]),
        next_try_at=int(r["next_try_at"]),
        last_error=str(r["last_error"]),
        created_at=int(r["created_at"]),
    )


class FilingStore:
    def __init__(self, db: Database, spool_dir: Path) -> None:
        self.db = db
        self.spool_dir = spool_dir
        #: Rows the mailbox already holds (LMTP answered 250) whose removal has not been
        #: committed yet, with when they were filed: the removal rides the next write that
        #: commits anyway (:meth:`forget_filed`, in the receiver's next batch) instead of
        #: costing a commit of its own.  Every query of the queue leaves them out; a crash
        #: forgets this list, and the rows (still *handed*) are looked up in the mailbox and
        #: removed without being filed again.
        self._filed: dict[int, tuple[Filing, int]] = {}

    # -- the spool files -------------------------------------------------------------------

    def path(self, key: bytes) -> Path:
        return self.spool_dir / f"{key.hex()}.eml"

    def _write_spool(self, key: bytes, message: MessageSource, prefix: bytes = b"") -> None:
        """Write ``prefix`` + the message, fsync, rename, fsync the directory: the file is
        whole or absent.  A message given as a file is copied in pieces of
        :data:`COPY_CHUNK`: a 50 MiB message is not read into memory here."""
        try:
            self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

            def fill(fd: int) -> None:
                write_all(fd, prefix)
                if isinstance(message, bytes):
                    write_all(fd, message)
                elif isinstance(message, Path):
                    with message.open("rb") as source:
                        _copy(fd, source)
                else:
                    _copy(fd, message)

            write_atomic(self.path(key), fill)
        except OSError as exc:
            raise StoreError(f"Cannot write mail to {self.spool_dir}: {exc}") from exc

    def remove_orphans(self) -> int:
        """Spool files without a row: a transaction that wrote one and then rolled back."""
        try:
            names = {p.name for p in self.spool_dir.iterdir()}
        except FileNotFoundError:
            return 0
        known = {f"{bytes(r[0]).hex()}.eml" for r in self.db.all("SELECT key FROM filing_queue")}
        gone = 0
        for name in names - known:
            with contextlib.suppress(OSError):
                (self.spool_dir / name).unlink()
                gone += 1
        return gone

    # -- adding ----------------------------------------------------------------------------

    def add(
        self,
        *,
        key: bytes,
        user: str,
        folder: str,
        message: MessageSource,
        now: int,
        prefix: bytes = b"",
        source: bytes | None = None,
        mark_seen: bool = False,
        unless_message_id: str | None = None,
        not_before: int | None = None,
        in_database: bool = False,
    ) -> int | None:
        """Queue ``prefix`` + ``message`` for ``folder``; the row id, or None if ``key`` is
        queued already.

        ``message`` is bytes, a file's path, or an open file, copied from where it stands to
        its end (in pieces: a large message is never held whole).  The spool file is fsynced
        before the row is written.  Call inside the caller's transaction to make the filing
        part of it.

        With ``in_database`` (``message`` as bytes, no prefix) the message goes into the
        ``filing_bodies`` table instead, durable with the caller's COMMIT and no fsync of
        its own: what lets a group commit of submissions cost one fsync
        (:class:`onionpost.device.submission.Submissions`).
        """
        if in_database and not isinstance(message, bytes):
            raise TypeError("only a message given as bytes is kept in the database")
        if not in_database:
            # Looked for first, so a filing already queued does not have its file rewritten.
            if self.db.scalar("SELECT 1 FROM filing_queue WHERE key = ?", (key,)):
                return None
            self._write_spool(key, message, prefix)
        start = now if not_before is None else not_before
        row = self.db.one(
            "INSERT INTO filing_queue (key, user, folder, source, mark_seen, unless_message_id,"
            " not_before, next_try_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (key) DO NOTHING RETURNING id",
            (key, user, folder, source, int(mark_seen), unless_message_id, start, start, now),
        )
        if row is None:  # queued already
            return None
        row_id = int(row[0])
        if isinstance(message, bytes) and in_database:
            data = prefix + message if prefix else message
            # As SubmissionStore.add: a zeroblob written through a blob handle, so SQLite
            # does not copy the message twice more.
            self.db.execute(
                "INSERT INTO filing_bodies (id, message) VALUES (?, zeroblob(?))",
                (row_id, len(data)),
            )
            if data:
                with self.db.conn.blobopen("filing_bodies", "message", row_id) as blob:
                    blob.write(data)
        return row_id

    def body(self, filing: Filing) -> bytes | None:
        """The message of a filing kept in the database; None for one with a spool file."""
        try:
            with self.db.conn.blobopen(
                "filing_bodies", "message", filing.id, readonly=True
            ) as blob:
                return blob.read()
        except sqlite3.OperationalError:  # no such row
            return None

    # -- the filer's side --------------------------------------------------------------------

    def get(self, filing_id: int) -> Filing | None:
        row = self.db.one("SELECT * FROM filing_queue WHERE id = ?", (filing_id,))
        return None if row is None else _filing(row)

    def due(self, now: int, limit: int = 100) -> list[Filing]:
        hidden, params = self._hidden()
        rows = self.db.all(
            f"SELECT * FROM filing_queue WHERE next_try_at <= ?{hidden}"  # noqa: S608 (only ?s)
            " ORDER BY next_try_at, id LIMIT ?",
            (now, *params, limit),
        )
        return [_filing(r) for r in rows]

    def next_due_at(self) -> int | None:
        hidden, params = self._hidden()
        v = self.db.scalar(
            f"SELECT MIN(next_try_at) FROM filing_queue WHERE 1{hidden}",  # noqa: S608 (only ?s)
            params,
        )
        return None if v is None else int(v)

    def pending_for(self, user: str, source: bytes) -> list[int]:
        hidden, params = self._hidden()
        return [
            int(r[0])
            for r in self.db.all(
                f"SELECT id FROM filing_queue WHERE user = ? AND source = ?{hidden}",  # noqa: S608
                (user, source, *params),
            )
        ]

    def _hidden(self) -> tuple[str, tuple[int, ...]]:
        """The SQL (and its parameters) that leaves out the rows filed but not yet removed."""
        if not self._filed:
            return "", ()
        ids = tuple(self._filed)
        return f" AND id NOT IN ({','.join('?' * len(ids))})", ids

    # -- removal riding the next commit -----------------------------------------------------

    def filed_later(self, filings: Sequence[Filing], now: int) -> None:
        """These rows are in the mailbox: hide them now, remove them with the next
        :meth:`forget_filed` (or :meth:`flush_filed`).  Nothing may depend on their removal
        being durable: until then a crash only costs a lookup of each in the mailbox."""
        for f in filings:
            self._filed.setdefault(f.id, (f, now))

    def filed_waiting(self) -> list[Filing]:
        """The rows filed whose removal has not been committed (see :meth:`filed_later`)."""
        return [f for f, _ in self._filed.values()]

    def oldest_filed_at(self) -> int | None:
        """When the longest-waiting of :meth:`filed_waiting` was filed; None if none waits."""
        return min((at for _, at in self._filed.values()), default=None)

    def forget_filed(self, filings: Sequence[Filing]) -> None:
        """Delete these filed rows, inside the caller's transaction (durable with its
        COMMIT); call :meth:`forgotten` after that COMMIT.  A rollback keeps them waiting.

        A row is matched by its id *and* its key: ids are reused (``INTEGER PRIMARY KEY``
        without ``AUTOINCREMENT``: a new row takes the highest id plus one), so a list
        that went stale while another step removed the rows and queued new ones must
        delete nothing (docs/performance.md, "Tried and taken back")."""
        if not filings:
            return
        self._delete_rows(filings)

    def _delete_rows(self, filings: Sequence[Filing]) -> None:
        """Delete these rows, each matched by id and key, :data:`_PAIRS_PER_STATEMENT` per
        statement, in one transaction (a savepoint of the caller's)."""
        with self.db.transaction():
            for i in range(0, len(filings), _PAIRS_PER_STATEMENT):
                pairs = filings[i : i + _PAIRS_PER_STATEMENT]
                marks = ",".join(["(?, ?)"] * len(pairs))
                self.db.execute(
                    f"DELETE FROM filing_queue WHERE (id, key) IN (VALUES {marks})",  # noqa: S608
                    tuple(v for f in pairs for v in (f.id, f.key)),
                )

    def _by_ids(self, sql: str, params: tuple[object, ...], ids: Sequence[int]) -> None:
        """``sql WHERE id IN (ids)`` as one step: one statement per 500 ids (SQLite bounds
        the number of parameters), without a savepoint when one statement does."""
        if len(ids) > 500:
            with self.db.transaction():
                for i in range(0, len(ids), 500):
                    self._by_ids(sql, params, ids[i : i + 500])
            return
        marks = ",".join("?" * len(ids))
        self.db.write(f"{sql} WHERE id IN ({marks})", (*params, *ids))

    def forgotten(self, filings: Sequence[Filing]) -> None:
        """The COMMIT holding :meth:`forget_filed` is done: drop them here, then their files."""
        for f in filings:
            kept = self._filed.get(f.id)
            if kept is not None and kept[0].key == f.key:  # not a new row with a reused id
                del self._filed[f.id]
        for f in filings:
            with contextlib.suppress(OSError):
                self.path(f.key).unlink()

    def flush_filed(self) -> int:
        """Remove every filed row still waiting, in a commit of its own (the node idles or
        stops); how many."""
        waiting = self.filed_waiting()
        if waiting:
            with self.db.transaction():
                self.forget_filed(waiting)
            self.forgotten(waiting)
        return len(waiting)

    def set_state(self, filing_id: int, state: int) -> None:
        with self.db.transaction():
            self.db.execute("UPDATE filing_queue SET state = ? WHERE id = ?", (state, filing_id))

    def get_many(self, ids: Sequence[int]) -> list[Filing]:
        """The rows of ``ids`` still queued, in the order given (one query, no commit)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = {
            int(r["id"]): _filing(r)
            for r in self.db.all(
                f"SELECT * FROM filing_queue WHERE id IN ({marks})",  # noqa: S608 (only ?s)
                tuple(ids),
            )
        }
        return [rows[i] for i in ids if i in rows and i not in self._filed]

    def set_states(self, ids: Sequence[int], state: int) -> None:
        """:meth:`set_state` for several rows in one transaction (one commit for a batch)."""
        if ids:
            self._by_ids("UPDATE filing_queue SET state = ?", (state,), ids)

    def deferred(self, filing_id: int, *, error: str, next_try_at: int) -> None:
        with self.db.transaction():
            self.db.execute(
                "UPDATE filing_queue SET attempts = attempts + 1, last_error = ?, "
                "next_try_at = ? WHERE id = ?",
                (error[:500], next_try_at, filing_id),
            )

    def done(self, filing: Filing) -> None:
        """The mailbox holds it: forget the row, then the spool file."""
        with self.db.transaction():
            self.db.execute(
                "DELETE FROM filing_queue WHERE id = ? AND key = ?", (filing.id, filing.key)
            )
        with contextlib.suppress(OSError):
            self.path(filing.key).unlink()

    def done_many(self, filings: Sequence[Filing]) -> None:
        """:meth:`done` for several rows: one transaction, then the spool files."""
        if not filings:
            return
        self._delete_rows(filings)
        for f in filings:
            with contextlib.suppress(OSError):
                self.path(f.key).unlink()

    def count(self, user: str | None = None) -> int:
        """Rows still to file (the filed ones waiting for their removal left out)."""
        hidden, params = self._hidden()
        if user is None:
            return self.db.count("filing_queue", f"1{hidden}", params)
        return self.db.count("filing_queue", f"user = ?{hidden}", (user, *params))

    def remove_user(self, user: str) -> int:
        rows = self.db.all("SELECT * FROM filing_queue WHERE user = ?", (user,))
        with self.db.transaction():
            self.db.execute("DELETE FROM filing_queue WHERE user = ?", (user,))
            self.db.execute("DELETE FROM mailbox_seen_ids WHERE user = ?", (user,))
        for r in rows:
            self._filed.pop(int(r["id"]), None)
            with contextlib.suppress(OSError):
                self.path(bytes(r["key"])).unlink()
        return len(rows)

    # -- message ids already taken from the inbox -------------------------------------------

    def is_seen(self, user: str, msg_id: bytes) -> bool:
        return bool(
            self.db.scalar(
                "SELECT 1 FROM mailbox_seen_ids WHERE user = ? AND msg_id = ?", (user, msg_id)
            )
        )

    def record_seen(self, user: str, msg_id: bytes, expires_at: int) -> bool:
        """Record ``msg_id``; False if it was recorded before (nothing to do then)."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO mailbox_seen_ids (user, msg_id, expires_at) VALUES (?, ?, ?)",
            (user, msg_id, expires_at),
        )
        return cur.rowcount == 1

    def prune_seen(self, now: int) -> int:
        """Forget message ids whose lifetime has ended (a replay would be refused as expired)."""
        with self.db.transaction():
            return self.db.execute(
                "DELETE FROM mailbox_seen_ids WHERE expires_at < ?", (now,)
            ).rowcount


def _copy(fd: int, source: Readable) -> None:
    while piece := source.read(COPY_CHUNK):
        write_all(fd, piece)
