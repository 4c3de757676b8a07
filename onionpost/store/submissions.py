"""Submitted mail waiting to be sealed (device side); see the migration for why it exists."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from onionpost.core.errors import IllegalTransition
from onionpost.core.queuestate import SUBMISSION
from onionpost.core.queuestate import RecipientState as S
from onionpost.store.db import Database


@dataclass(frozen=True)
class PendingRecipient:
    submission_id: int
    user: str
    address: str
    attempts: int
    created_at: int
    expires_at: int
    message_ref: str
    last_error: str | None
    last_error_code: str | None
    state: str
    next_attempt_at: int
    outbox_id: int | None
    notified: int


_SELECT = (
    "SELECT r.submission_id, s.user, r.address, r.attempts, s.created_at, s.expires_at,"
    " s.message_ref, r.last_error, r.last_error_code, r.state, r.next_attempt_at, r.outbox_id,"
    " r.notified FROM submission_recipients r JOIN submissions s ON s.id = r.submission_id"
)


class SubmissionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(
        self,
        *,
        user: str,
        message: bytes,
        headers: bytes,
        recipients: Sequence[str],
        message_ref: str,
        now: int,
        expires_at: int,
        content_type: int = 0,
    ) -> int:
        """Queue a submission; call inside the caller's transaction to combine it with more.

        ``content_type`` is the L3 content type the body is sealed as (0, a mail, unless
        it is an introduction: see the migration ``0004_content_type``)."""
        with self.db.transaction() as c:
            cur = c.execute(
                "INSERT INTO submissions (user, headers, message_ref, created_at, expires_at,"
                " content_type) VALUES (?, ?, ?, ?, ?, ?)",
                (user, headers, message_ref, now, expires_at, content_type),
            )
            sid = cur.lastrowid
            assert sid is not None
            # A zeroblob in a row of its own, written through a blob handle: binding the
            # bytes would have SQLite copy the message twice more (the bound value, then the
            # record), and so would a zeroblob followed by other columns.
            c.execute(
                "INSERT INTO submission_bodies (id, message) VALUES (?, zeroblob(?))",
                (sid, len(message)),
            )
            if message:
                with c.blobopen("submission_bodies", "message", sid) as blob:
                    blob.write(message)
            SUBMISSION.check(None, S.PENDING)  # the column's default
            for address in sorted(set(recipients)):
                c.execute(
                    "INSERT INTO submission_recipients (submission_id, address, next_attempt_at)"
                    " VALUES (?, ?, ?)",
                    (sid, address, now),
                )
            return sid

    def headers(self, submission_id: int) -> bytes:
        return bytes(
            self.db.scalar("SELECT headers FROM submissions WHERE id = ?", (submission_id,)) or b""
        )

    def content_type(self, submission_id: int) -> int:
        return int(
            self.db.scalar("SELECT content_type FROM submissions WHERE id = ?", (submission_id,))
            or 0
        )

    def message_size(self, submission_id: int) -> int:
        """The stored message's length, from its blob handle (no page of it read)."""
        try:
            with self.db.conn.blobopen(
                "submission_bodies", "message", submission_id, readonly=True
            ) as blob:
                return len(blob)
        except sqlite3.OperationalError:  # no such row
            return 0

    def message(self, submission_id: int) -> bytes:
        """The stored message, read through a blob handle straight into one bytes object."""
        try:
            with self.db.conn.blobopen(
                "submission_bodies", "message", submission_id, readonly=True
            ) as blob:
                return blob.read()
        except sqlite3.OperationalError:  # no such row
            return b""

    def due(
        self, now: int, *, limit: int = 32, after: tuple[int, str] = (0, "")
    ) -> dict[int, list[PendingRecipient]]:
        """Pending recipients due now, grouped by submission (sealed together), in
        (submission, address) order after ``after``: a pass pages through the queue once,
        so a recipient that stays due (waiting for this node's tor) is not tried again and
        again in the same pass."""
        rows = self.db.all(
            _SELECT + " WHERE r.state = 'pending' AND r.next_attempt_at <= ?"
            " AND (r.submission_id, r.address) > (?, ?)"
            " ORDER BY r.submission_id, r.address LIMIT ?",
            (now, after[0], after[1], limit),
        )
        out: dict[int, list[PendingRecipient]] = {}
        for r in rows:
            out.setdefault(r[0], []).append(PendingRecipient(*tuple(r)))
        return out

    def next_due_at(self) -> int | None:
        v = self.db.scalar(
            "SELECT min(next_attempt_at) FROM submission_recipients WHERE state = 'pending'"
        )
        return None if v is None else int(v)

    def mark_queued(self, submission_id: int, address: str, outbox_id: int) -> None:
        t = SUBMISSION.check(S.PENDING, S.QUEUED)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET state = ?, outbox_id = ?,"
                " attempts = attempts + 1, last_error = NULL, last_error_code = NULL"
                " WHERE submission_id = ? AND address = ? AND state = ?",
                (t.target, outbox_id, submission_id, address, t.source),
            )
            self._drop_finished(c, submission_id)

    def mark_delivered(self, submission_id: int, address: str) -> None:
        """Done without the outbox: mail to the user themself, filed on this device."""
        t = SUBMISSION.check(S.PENDING, S.DELIVERED)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET state = ?"
                " WHERE submission_id = ? AND address = ? AND state = ?",
                (t.target, submission_id, address, t.source),
            )
            self._drop_finished(c, submission_id)

    def mark_deferred(
        self, submission_id: int, address: str, *, next_attempt_at: int, error: str, code: str
    ) -> None:
        t = SUBMISSION.check(S.PENDING, S.PENDING)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET attempts = attempts + 1, next_attempt_at = ?,"
                " last_error = ?, last_error_code = ? WHERE submission_id = ? AND address = ?"
                " AND state = ?",
                (next_attempt_at, error, code, submission_id, address, t.source),
            )

    def note_waiting(self, submission_id: int, address: str, *, error: str, code: str) -> None:
        """Say why a recipient still waits without counting an attempt or moving its next
        try (the reason was on this side, not the recipient's: this node's tor is starting)."""
        t = SUBMISSION.check(S.PENDING, S.PENDING)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET last_error = ?, last_error_code = ?"
                " WHERE submission_id = ? AND address = ? AND state = ?",
                (error, code, submission_id, address, t.source),
            )

    def mark_bounced(self, submission_id: int, address: str, *, error: str, code: str) -> None:
        t = SUBMISSION.check(S.PENDING, S.BOUNCED)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET state = ?, attempts = attempts + 1,"
                " last_error = ?, last_error_code = ? WHERE submission_id = ? AND address = ?"
                " AND state = ?",
                (t.target, error, code, submission_id, address, t.source),
            )

    def mark_notified(self, submission_id: int, address: str, level: int) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET notified = max(notified, ?)"
                " WHERE submission_id = ? AND address = ?",
                (level, submission_id, address),
            )

    def cancel(
        self, submission_id: int, address: str | None = None, *, user: str | None = None
    ) -> int:
        """Withdraw recipients still waiting to be sealed (of ``user``'s mail, when given)."""
        t = SUBMISSION.check(S.PENDING, S.CANCELLED)
        with self.db.transaction() as c:
            sql = "UPDATE submission_recipients SET state = ? WHERE submission_id = ? AND state = ?"
            params: tuple[object, ...] = (t.target, submission_id, t.source)
            if address is not None:
                sql += " AND address = ?"
                params = (*params, address)
            if user is not None:
                sql += " AND submission_id IN (SELECT id FROM submissions WHERE user = ?)"
                params = (*params, user)
            n = c.execute(sql, params).rowcount
            self._drop_finished(c, submission_id)
            return n

    def retry_now(
        self, now: int, submission_id: int | None = None, *, user: str | None = None
    ) -> int:
        """Make waiting recipients due now: one submission's or all (``user``'s, when given)."""
        return self._due_now(now, S.PENDING, ("submission_id", submission_id), user)

    def outbox_due_now(
        self, now: int, outbox_id: int | None = None, *, user: str | None = None
    ) -> int:
        """The handed-over recipients (all, ``user``'s, or the one of outbox row
        ``outbox_id``) have their next attempt now: ``queue retry`` made their outbox rows
        due, and the next outcome check asks about them at once."""
        return self._due_now(now, S.QUEUED, ("outbox_id", outbox_id), user)

    def _due_now(
        self,
        now: int,
        state: str,
        one: tuple[Literal["submission_id", "outbox_id"], int | None],
        user: str | None,
    ) -> int:
        t = SUBMISSION.check(state, state)
        sql = "UPDATE submission_recipients SET next_attempt_at = ? WHERE state = ?"
        params: tuple[object, ...] = (now, t.source)
        column, value = one
        if value is not None:
            sql += f" AND {column} = ?"
            params = (*params, value)
        if user is not None:
            sql += " AND submission_id IN (SELECT id FROM submissions WHERE user = ?)"
            params = (*params, user)
        with self.db.transaction() as c:
            return int(c.execute(sql, params).rowcount)

    def remove_user(self, user: str) -> int:
        """Delete everything ``user`` submitted, sent or not (the user is being removed)."""
        with self.db.transaction() as c:
            return int(c.execute("DELETE FROM submissions WHERE user = ?", (user,)).rowcount)

    def handed_over(self, user: str, *, due_by: int | None = None) -> list[PendingRecipient]:
        """Recipients whose mail is in the inbox's outbox and whose fate is not known yet
        (only those whose next attempt, as last learnt, is at ``due_by`` or before)."""
        sql = _SELECT + " WHERE r.state = 'queued' AND s.user = ?"
        params: tuple[object, ...] = (user,)
        if due_by is not None:
            sql += " AND r.next_attempt_at <= ?"
            params = (*params, due_by)
        return [PendingRecipient(*tuple(r)) for r in self.db.all(sql + " ORDER BY s.id", params)]

    def set_outcome(
        self, submission_id: int, address: str, state: str, error: str | None, code: str | None
    ) -> None:
        """Record what the inbox's outbox finally did (delivered, bounced or cancelled)."""
        t = SUBMISSION.check(S.QUEUED, state)
        if t.target not in SUBMISSION.final:  # re-sealing is :meth:`reseal`, progress
            raise IllegalTransition(f"'{state}' is not an outcome of the outbox.")
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET state = ?, last_error = coalesce(?, last_error),"
                " last_error_code = coalesce(?, last_error_code) WHERE submission_id = ?"
                " AND address = ? AND state = ?",
                (t.target, error, code, submission_id, address, t.source),
            )
            self._drop_finished(c, submission_id)

    def set_progress(
        self,
        *,
        submission_id: int,
        address: str,
        attempts: int,
        error: str | None,
        code: str | None,
        next_attempt_at: int,
    ) -> None:
        """What the outbox last reported of a recipient still on its way there."""
        t = SUBMISSION.check(S.QUEUED, S.QUEUED)
        with self.db.transaction() as c:
            c.execute(
                "UPDATE submission_recipients SET attempts = ?, last_error = ?,"
                " last_error_code = ?, next_attempt_at = ? WHERE submission_id = ? AND address = ?"
                " AND state = ?",
                (attempts, error, code, next_attempt_at, submission_id, address, t.source),
            )

    def purge(self, before: int) -> int:
        """Forget finished submissions created before ``before``."""
        with self.db.transaction() as c:
            return c.execute(
                "DELETE FROM submissions WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM"
                " submission_recipients r WHERE r.submission_id = submissions.id AND r.state IN"
                " ('pending', 'queued'))",
                (before,),
            ).rowcount

    def unnotified_bounces(self, user: str) -> list[PendingRecipient]:
        return [
            PendingRecipient(*tuple(r))
            for r in self.db.all(
                _SELECT + " WHERE s.user = ? AND r.state = 'bounced' AND r.notified < 2",
                (user,),
            )
        ]

    def awaiting_delay_notice(self, user: str, created_before: int) -> list[PendingRecipient]:
        """Recipients still pending or queued, with no delay notice yet, of submissions made
        before ``created_before``: usually none, however long the queue."""
        return [
            PendingRecipient(*tuple(r))
            for r in self.db.all(
                _SELECT + " WHERE s.user = ? AND s.created_at <= ? AND r.notified < 1"
                " AND r.state IN ('pending', 'queued') ORDER BY s.id",
                (user, created_before),
            )
        ]

    def listing(self, user: str | None = None) -> list[PendingRecipient]:
        sql = _SELECT + " WHERE r.state IN ('pending', 'queued')"
        params: tuple[object, ...] = ()
        if user is not None:
            sql += " AND s.user = ?"
            params = (user,)
        return [PendingRecipient(*tuple(r)) for r in self.db.all(sql + " ORDER BY s.id", params)]

    def waiting_counts(self) -> dict[str, int]:
        """How many recipients :meth:`listing` would list, by state ('pending', 'queued'):
        counted by SQLite, no row read into Python."""
        return {
            str(r[0]): int(r[1])
            for r in self.db.all(
                "SELECT r.state, COUNT(*) FROM submission_recipients r"
                " JOIN submissions s ON s.id = r.submission_id"
                " WHERE r.state IN ('pending', 'queued') GROUP BY r.state"
            )
        }

    def outbox_recipients(self) -> dict[int, tuple[str, str]]:
        """Outbox row -> (user, recipient address) for every recipient handed to an outbox
        (the outbox itself keeps no recipient address)."""
        return {
            int(r[0]): (str(r[1]), str(r[2]))
            for r in self.db.all(
                "SELECT r.outbox_id, s.user, r.address FROM submission_recipients r"
                " JOIN submissions s ON s.id = r.submission_id WHERE r.outbox_id IS NOT NULL"
            )
        }

    def outcomes(
        self, *, since: int, sealed: bool, user: str | None = None
    ) -> list[tuple[str, int]]:
        """(state, count) of finished recipients of submissions made since ``since`` (by
        ``user`` if given); with ``sealed`` False only those that never reached an outbox
        (the outbox counts the rest)."""
        rows = self.db.all(
            "SELECT r.state, count(*) FROM submission_recipients r JOIN submissions s"
            " ON s.id = r.submission_id WHERE r.state NOT IN ('pending', 'queued')"
            " AND s.created_at >= ? AND (? OR r.outbox_id IS NULL)"
            " AND (? IS NULL OR s.user = ?) GROUP BY r.state",
            (since, int(sealed), user, user),
        )
        return [(str(r[0]), int(r[1])) for r in rows]

    @staticmethod
    def _drop_finished(c: sqlite3.Connection, submission_id: int) -> None:
        """Forget the plaintext once every recipient's fate is known (it lives on in Sent;
        the header block stays for delivery status notifications).  Until then it is kept:
        a copy handed back because the recipient's keys changed must be sealed again."""
        c.execute(
            "DELETE FROM submission_bodies WHERE id = ? AND NOT EXISTS (SELECT 1 FROM"
            " submission_recipients WHERE submission_id = ? AND state IN ('pending', 'queued'))",
            (submission_id, submission_id),
        )

    def reseal(self, submission_id: int, address: str, now: int) -> bool:
        """Send a recipient back to sealing (its inbox refused the keys we used)."""
        t = SUBMISSION.check(S.QUEUED, S.PENDING)
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE submission_recipients SET state = ?, next_attempt_at = ?"
                    " WHERE submission_id = ? AND address = ? AND state = ? AND EXISTS"
                    " (SELECT 1 FROM submission_bodies WHERE id = ? AND length(message) > 0)",
                    (t.target, now, submission_id, address, t.source, submission_id),
                ).rowcount
                > 0
            )
