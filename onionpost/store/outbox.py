"""The outbox: one row per (sealed message, destination inbox); the table is the truth.

A submission is acknowledged only after :meth:`OutboxStore.enqueue` commits.  Delivery
workers *claim* due rows (pushing ``next_attempt_at`` forward first, so two workers or a
crash in the middle never deliver the same row twice at once) and then record exactly one
outcome.  Rows are idempotent on the submitting device's key: a device that retries a
submission after a lost reply does not queue the message twice.

A row keeps what delivery needs and no more (docs/threat-model.md): the destination inbox's
onion while it is queued (never the recipient's local part), the sealed envelope until the
outcome, and only a keyed hash of the device's idempotency key (which names the recipient).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from onionpost.core.crypto.envelope import Readable, Writable
from onionpost.core.errors import StoreError
from onionpost.core.queuestate import OUTBOX, RESEAL_CODE
from onionpost.core.queuestate import OutboxState as S
from onionpost.store.db import Database, translate

#: Envelopes move between files and the database in pieces of this size, never whole.
BLOB_CHUNK = 1 << 20


@dataclass(frozen=True)
class OutboxRow:
    id: int
    mailbox_id: bytes
    device_id: bytes
    onion: str  # the destination inbox's onion label; '' once the row finished
    created_at: int
    expires_at: int
    next_attempt_at: int
    attempts: int
    last_error: str | None
    last_error_code: str | None
    last_attempt_at: int | None
    state: str
    finished_at: int | None


_COLUMNS = (
    "id, mailbox_id, device_id, onion, created_at, expires_at, next_attempt_at, attempts,"
    " last_error, last_error_code, last_attempt_at, state, finished_at"
)


def _row(r: sqlite3.Row) -> OutboxRow:
    return OutboxRow(*tuple(r))


class OutboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        #: Rows the worker delivered whose mark has not been committed yet (row id -> when):
        #: the marks ride the next hand-over's commit (:meth:`enqueue`), or the end of the
        #: worker's run (:meth:`flush_marks`).  Nothing is acknowledged on them, and the
        #: worker's queries leave these rows out meanwhile.
        self._marks: dict[int, int] = {}
        #: Row ids whose marks a commit carried since the worker last asked (:meth:`committed`).
        self._carried: list[int] = []

    def mark_delivered_later(self, row_ids: Sequence[int], *, now: int) -> None:
        """:meth:`mark_delivered` for these rows, with the next commit (see ``_marks``).  A
        crash first makes them go out again; the receiving inbox drops the repeat by its
        digest."""
        for row_id in row_ids:
            self._marks.setdefault(row_id, now)

    def marks_waiting(self) -> int:
        return len(self._marks)

    def flush_marks(self) -> None:
        """Commit the marks still waiting (the worker's run ends)."""
        if self._marks:
            with self.transaction_with_marks():
                pass

    @contextlib.contextmanager
    def transaction_with_marks(self) -> Iterator[sqlite3.Connection]:
        """A transaction that also commits the worker's waiting delivered marks.

        Inside another transaction it is a plain nested block: the outermost one carries
        the marks, so none is dropped from memory before the COMMIT that holds it.
        """
        if self.db.in_transaction:
            with self.db.transaction() as c:
                yield c
            return
        with self.db.transaction() as c:
            taken = self._apply_marks()
            yield c
        self._marks_carried(taken)

    def committed(self) -> list[int]:
        """The rows whose delivered mark was committed since the last call."""
        out, self._carried = self._carried, []
        return out

    def _apply_marks(self) -> dict[int, int]:
        taken = dict(self._marks)
        by_time: dict[int, list[int]] = {}
        for row_id, now in taken.items():
            by_time.setdefault(now, []).append(row_id)
        with self.db.transaction():
            for now, row_ids in by_time.items():
                self.mark_delivered_many(row_ids, now=now)
        return taken

    def _marks_carried(self, taken: dict[int, int]) -> None:
        for row_id in taken:
            self._marks.pop(row_id, None)
        self._carried.extend(taken)

    def enqueue(
        self,
        *,
        mailbox_id: bytes,
        device_id: bytes,
        onion: str,
        envelope: bytes | tuple[Readable, int],
        submission_key: str,
        now: int,
        expires_at: int,
    ) -> int:
        """Queue an envelope for the inbox at ``onion``; durable on return.

        Idempotent on ``submission_key`` (stored as its keyed hash): the same key returns the
        existing row (and the new envelope, a re-sealing of the same message, is discarded).
        ``envelope`` is the bytes or ``(source, length)``, copied into the row in pieces (a
        64 MiB envelope is never held in memory here).  The worker's delivered marks still
        waiting ride this commit (:meth:`mark_delivered_later`), or the outer transaction's
        when this is called inside one (:meth:`Inbox.submit_many`).
        """
        key_hash = self.db.record_hash(submission_key)
        size = envelope[1] if isinstance(envelope, tuple) else len(envelope)
        with self.transaction_with_marks() as c:
            row = c.execute(
                "SELECT id, state FROM outbox WHERE mailbox_id = ? AND submission_hash = ?",
                (mailbox_id, key_hash),
            ).fetchone()
            if row is None:
                OUTBOX.check(None, S.QUEUED)  # the column's default
                cur = c.execute(
                    "INSERT INTO outbox (mailbox_id, device_id, onion, submission_hash,"
                    " created_at, expires_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (mailbox_id, device_id, onion, key_hash, now, expires_at, now),
                )
                assert cur.lastrowid is not None
                row_id = cur.lastrowid
                _write_blob(c, row_id, size, envelope)
            else:
                row_id = int(row[0])
                if row[1] == S.RESEAL:
                    # handed back because the recipient's keys changed: this is the re-sealing
                    t = OUTBOX.check(S.RESEAL, S.QUEUED)
                    c.execute(
                        "UPDATE outbox SET onion = ?, state = ?,"
                        " next_attempt_at = ?, leased_until = NULL, finished_at = NULL,"
                        " last_error = NULL, last_error_code = NULL WHERE id = ? AND state = ?",
                        (onion, t.target, now, row_id, t.source),
                    )
                    _write_blob(c, row_id, size, envelope)
        return row_id

    def get(self, row_id: int) -> OutboxRow | None:
        r = self.db.one(f"SELECT {_COLUMNS} FROM outbox WHERE id = ?", (row_id,))  # noqa: S608
        return _row(r) if r else None

    def envelope(self, row_id: int) -> bytes:
        return bytes(
            self.db.scalar("SELECT envelope FROM outbox_envelopes WHERE id = ?", (row_id,)) or b""
        )

    def copy_envelope(self, row_id: int, sink: Writable) -> int:
        """Write a row's envelope to ``sink`` in pieces; return its length (0: none)."""
        try:
            with self.db.conn.blobopen(
                "outbox_envelopes", "envelope", row_id, readonly=True
            ) as blob:
                size = len(blob)
                while piece := blob.read(BLOB_CHUNK):
                    sink.write(piece)
        except sqlite3.OperationalError:  # no such row (purged meanwhile)
            return 0
        except sqlite3.Error as exc:
            raise translate(exc) from exc
        return size

    def envelope_sizes(self, row_ids: list[int]) -> dict[int, int]:
        """Each row's envelope length (rows purged meanwhile are left out), from the
        record alone: ``length()`` of a blob reads no page of it."""
        if not row_ids:
            return {}
        marks = ",".join("?" * len(row_ids))
        rows = self.db.all(
            f"SELECT id, length(envelope) FROM outbox_envelopes WHERE id IN ({marks})",  # noqa: S608
            tuple(row_ids),
        )
        return {r[0]: r[1] for r in rows}

    def claim_due(
        self, now: int, *, limit: int, lease: int, only_onion: str | None = None
    ) -> list[OutboxRow]:
        """Queued rows due now, leased for ``lease`` seconds so nobody else takes them;
        with ``only_onion``, only rows for that inbox (this node's own, while tor is down)."""
        OUTBOX.check(S.QUEUED, S.QUEUED)
        where = ""
        params: tuple[object, ...] = (now, now)
        if only_onion is not None:
            where = " AND onion = ?"
            params = (*params, only_onion)
        with self.db.transaction() as c:
            rows = c.execute(
                f"SELECT {_COLUMNS} FROM outbox WHERE state = 'queued' AND next_attempt_at <= ?"  # noqa: S608
                f" AND (leased_until IS NULL OR leased_until < ?){where}"
                " ORDER BY next_attempt_at, id LIMIT ?",
                (*params, limit),
            ).fetchall()
            for r in rows:
                c.execute("UPDATE outbox SET leased_until = ? WHERE id = ?", (now + lease, r["id"]))
            return [_row(r) for r in rows]

    def due_rows(
        self,
        now: int,
        *,
        limit: int,
        skip: Collection[int] = (),
        only_onion: str | None = None,
    ) -> list[OutboxRow]:
        """Queued rows due now, except ``skip`` (the ones the caller has in flight) and the
        delivered ones whose mark waits (:meth:`mark_delivered_later`): what
        :meth:`claim_due` claims, read without a commit.  The worker keeps its claims in
        memory; a lease in the database would protect nothing more (only this process
        delivers, and :meth:`release_leases` forgets every lease at start-up)."""
        where = ""
        params: tuple[object, ...] = (now, now)
        if only_onion is not None:
            where = " AND onion = ?"
            params = (*params, only_onion)
        skip = {*skip, *self._marks}
        if skip:
            where += f" AND id NOT IN ({','.join('?' * len(skip))})"
            params = (*params, *skip)
        rows = self.db.all(
            f"SELECT {_COLUMNS} FROM outbox WHERE state = 'queued' AND next_attempt_at <= ?"  # noqa: S608
            f" AND (leased_until IS NULL OR leased_until < ?){where}"
            " ORDER BY next_attempt_at, id LIMIT ?",
            (*params, limit),
        )
        return [_row(r) for r in rows]

    def release_leases(self) -> int:
        """Forget every claim: called once at start-up, when no worker can hold one."""
        with self.db.transaction() as c:
            return c.execute(
                "UPDATE outbox SET leased_until = NULL WHERE leased_until IS NOT NULL"
            ).rowcount

    def queued_count(self) -> int:
        return self.db.count("outbox", "state = ?", ["queued"])

    def outcomes(self, *, since: int, mailbox_id: bytes | None = None) -> list[tuple[str, int]]:
        """(state, count) of rows finished since ``since`` (of ``mailbox_id`` if given): final
        states only (a row handed back for re-sealing is not an outcome)."""
        final = sorted(OUTBOX.final)
        marks = ",".join("?" * len(final))
        rows = self.db.all(
            f"SELECT state, count(*) FROM outbox WHERE state IN ({marks})"  # noqa: S608
            " AND finished_at >= ? AND (? IS NULL OR mailbox_id = ?) GROUP BY state",
            (*final, since, mailbox_id, mailbox_id),
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    def next_due_at(self) -> int | None:
        v = self.db.scalar(
            "SELECT min(max(next_attempt_at, coalesce(leased_until, 0))) FROM outbox"
            " WHERE state = 'queued'"
        )
        return None if v is None else int(v)

    def mark_delivered(self, row_id: int, *, now: int) -> None:
        self.mark_delivered_many([row_id], now=now)

    def mark_delivered_many(self, row_ids: Sequence[int], *, now: int) -> None:
        """:meth:`mark_delivered` for several rows, in one transaction: two statements for
        up to :data:`_IDS_PER_STATEMENT` rows (a drain marks hundreds a second)."""
        if not row_ids:
            return
        t = OUTBOX.check(S.QUEUED, S.DELIVERED)
        with self.db.transaction() as c:
            for i in range(0, len(row_ids), _IDS_PER_STATEMENT):
                ids = row_ids[i : i + _IDS_PER_STATEMENT]
                marks = ",".join("?" * len(ids))
                c.execute(
                    "UPDATE outbox SET state = ?, finished_at = ?,"  # noqa: S608
                    " attempts = attempts + 1, last_attempt_at = ?, last_error = NULL,"
                    " leased_until = NULL, last_error_code = NULL, onion = ''"
                    f" WHERE id IN ({marks}) AND state = ?",
                    (t.target, now, now, *ids, t.source),
                )
                _drop_envelopes(c, ids)

    def mark_deferred(
        self, row_id: int, *, now: int, next_attempt_at: int, error: str, code: str
    ) -> None:
        t = OUTBOX.check(S.QUEUED, S.QUEUED)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_attempt_at = ?, last_error = ?,"
                " last_error_code = ?, next_attempt_at = ?, leased_until = NULL"
                " WHERE id = ? AND state = ?",
                (now, error, code, next_attempt_at, row_id, t.source),
            )

    def note_waiting(self, row_id: int, *, error: str, code: str, until: int) -> None:
        """Say why a row waits, without counting an attempt or moving its next try; the
        lease keeps it from being claimed again before ``until``."""
        t = OUTBOX.check(S.QUEUED, S.QUEUED)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE outbox SET last_error = ?, last_error_code = ?, leased_until = ?"
                " WHERE id = ? AND state = ?",
                (error, code, until, row_id, t.source),
            )

    def mark_bounced(
        self, row_id: int, *, now: int, error: str, code: str, attempted: bool
    ) -> None:
        self._finish(S.BOUNCED, row_id, now=now, error=error, code=code, attempted=attempted)

    def mark_reseal(self, row_id: int, *, now: int, error: str) -> None:
        """Hand the row back: the recipient's keys changed, so its device must seal the
        message again (and enqueue it under the same key, which requeues this row)."""
        self._finish(S.RESEAL, row_id, now=now, error=error, code=RESEAL_CODE, attempted=True)

    def _finish(
        self, target: S, row_id: int, *, now: int, error: str, code: str, attempted: bool
    ) -> None:
        t = OUTBOX.check(S.QUEUED, target)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE outbox SET state = ?, finished_at = ?, last_error = ?,"
                " leased_until = NULL,"
                " last_error_code = ?, attempts = attempts + ?, last_attempt_at = CASE WHEN ?"
                " THEN ? ELSE last_attempt_at END, onion = ''"
                " WHERE id = ? AND state = ?",
                (t.target, now, error, code, int(attempted), int(attempted), now, row_id, t.source),
            )
            _drop_envelopes(c, [row_id])

    def cancel(self, row_id: int, *, now: int, mailbox_id: bytes | None = None) -> bool:
        t = OUTBOX.check(S.QUEUED, S.CANCELLED)
        sql = "UPDATE outbox SET state = ?, finished_at = ?, onion = '' WHERE id = ? AND state = ?"
        params: tuple[object, ...] = (t.target, now, row_id, t.source)
        if mailbox_id is not None:
            sql += " AND mailbox_id = ?"
            params = (*params, mailbox_id)
        with self.db.transaction() as c:
            if c.execute(sql, params).rowcount == 0:
                return False
            _drop_envelopes(c, [row_id])
            return True

    def retry_now(
        self, now: int, row_id: int | None = None, *, mailbox_id: bytes | None = None
    ) -> int:
        """Make queued rows due now: one row or all (of one mailbox, when given)."""
        t = OUTBOX.check(S.QUEUED, S.QUEUED)
        sql = "UPDATE outbox SET next_attempt_at = ? WHERE state = ?"
        params: tuple[object, ...] = (now, t.source)
        if row_id is not None:
            sql += " AND id = ?"
            params = (*params, row_id)
        if mailbox_id is not None:
            sql += " AND mailbox_id = ?"
            params = (*params, mailbox_id)
        with self.db.transaction() as c:
            return int(c.execute(sql, params).rowcount)

    def remove_mailbox(self, mailbox_id: bytes) -> int:
        """Delete a removed mailbox's rows, queued ones included: nobody is left to send as."""
        with self.db.transaction() as c:
            return int(c.execute("DELETE FROM outbox WHERE mailbox_id = ?", (mailbox_id,)).rowcount)

    def rows(
        self, *, mailbox_id: bytes | None = None, states: tuple[str, ...] = ("queued",)
    ) -> list[OutboxRow]:
        marks = ",".join("?" * len(states))
        sql = f"SELECT {_COLUMNS} FROM outbox WHERE state IN ({marks})"  # noqa: S608
        params: tuple[object, ...] = states
        if mailbox_id is not None:
            sql += " AND mailbox_id = ?"
            params = (*params, mailbox_id)
        return [_row(r) for r in self.db.all(sql + " ORDER BY created_at, id", params)]

    def waiting_counts(self) -> tuple[int, int]:
        """(not tried yet, tried and deferred) among the rows :meth:`rows` lists by default:
        counted by SQLite, no row read into Python (a node with a backlog of thousands
        writes its status every few seconds)."""
        fresh, deferred = 0, 0
        for tried, n in self.db.all(
            "SELECT attempts > 0, COUNT(*) FROM outbox WHERE state = 'queued' GROUP BY 1"
        ):
            if tried:
                deferred += int(n)
            else:
                fresh += int(n)
        return fresh, deferred

    def rows_by_ids(self, mailbox_id: bytes, ids: list[int]) -> list[OutboxRow]:
        """These rows of this mailbox (others' rows are never revealed)."""
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        sql = f"SELECT {_COLUMNS} FROM outbox WHERE mailbox_id = ? AND id IN ({marks})"  # noqa: S608
        return [_row(r) for r in self.db.all(sql, (mailbox_id, *ids))]

    def purge_finished(self, before: int) -> int:
        purged = sorted(OUTBOX.purged)
        marks = ",".join("?" * len(purged))
        with self.db.transaction() as c:
            return c.execute(
                f"DELETE FROM outbox WHERE state IN ({marks}) AND finished_at < ?",  # noqa: S608
                (*purged, before),
            ).rowcount


#: Row ids per statement where a statement names many (SQLite bounds its parameters).
_IDS_PER_STATEMENT = 500


def _drop_envelopes(c: sqlite3.Connection, rowids: Sequence[int]) -> None:
    """Finished rows' envelopes go (the rows stay for the device's status questions); up to
    :data:`_IDS_PER_STATEMENT` rows in one statement."""
    marks = ",".join("?" * len(rowids))
    c.execute(
        f"DELETE FROM outbox_envelopes WHERE id IN ({marks}) AND"  # noqa: S608
        " (SELECT state FROM outbox WHERE outbox.id = outbox_envelopes.id) IS NOT 'queued'",
        tuple(rowids),
    )


def _write_blob(
    c: sqlite3.Connection, rowid: int, size: int, envelope: bytes | tuple[Readable, int]
) -> None:
    """Store ``rowid``'s envelope: a zeroblob in a row of its own (the row's last column,
    so SQLite never builds the record in memory), filled through a blob handle."""
    try:
        c.execute(
            "INSERT OR REPLACE INTO outbox_envelopes (id, envelope) VALUES (?, zeroblob(?))",
            (rowid, size),
        )
        with c.blobopen("outbox_envelopes", "envelope", rowid) as blob:
            if not isinstance(envelope, tuple):
                blob.write(envelope)
                return
            source, left = envelope
            while left:
                piece = source.read(min(BLOB_CHUNK, left))
                if not piece:
                    raise StoreError("The envelope to queue ended early.")
                blob.write(piece)
                left -= len(piece)
    except sqlite3.Error as exc:
        raise translate(exc) from exc
