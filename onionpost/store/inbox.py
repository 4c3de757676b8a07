"""Inbox-side storage: mailboxes and their published keys, spools of sealed mail, anti-spam state.

The inbox never sees plaintext; what it stores are signed public records and L2 envelopes.
Envelope digests, only ever compared, are stored as their keyed hash (``Database.record_hash``);
docs/threat-model.md lists every column and what it holds.
:meth:`InboxStore.accept_sealed` is the durability point of a delivery: it returns (and the
peer is told ``accepted``) only after the envelope, its per-device spool entries and its
dedup record are committed together.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from onionpost.core import quota
from onionpost.core.crypto.envelope import Readable
from onionpost.core.errors import StoreError
from onionpost.core.wire import PENDING_LIST_MAX
from onionpost.store.db import Database, translate

BLOB_CHUNK = 1 << 20


@dataclass(frozen=True)
class MailboxRow:
    mailbox_id: bytes
    local: str
    uik_pk: bytes
    binding: bytes
    device_list: bytes
    device_list_version: int
    profile: bytes | None
    accepts_strangers: bool
    pow_bits: int | None
    quota_bytes: int | None


@dataclass(frozen=True)
class DeviceRow:
    device_id: bytes
    name: str
    dsk_seq: int
    dsk_pk: bytes
    revoked_at: int | None


@dataclass(frozen=True)
class SpoolEntry:
    spool_id: int
    size: int
    received_at: int


@dataclass(frozen=True)
class RateBucket:
    """One counter an accepted event is charged to: ``limit`` events per window."""

    scope: str
    key: bytes
    limit: int


@dataclass(frozen=True)
class Accepted:
    receipt: str
    duplicate: bool


def _mailbox(row: sqlite3.Row) -> MailboxRow:
    return MailboxRow(
        row["mailbox_id"],
        row["local"],
        row["uik_pk"],
        row["binding"],
        row["device_list"],
        row["device_list_version"],
        row["profile"],
        bool(row["accepts_strangers"]),
        row["pow_bits"],
        row["quota_bytes"],
    )


class _BucketFull(Exception):
    """Unwinds :meth:`InboxStore.take_rates`'s savepoint when one bucket is full."""

    def __init__(self, bucket: RateBucket) -> None:
        self.bucket = bucket


class InboxStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        #: Spool rows a device acknowledged (:meth:`acknowledge_later`) whose deletion has
        #: not been committed yet: spool id -> (mailbox, device).  Hidden from the device's
        #: pending list and fetches; deleted by the next write that commits anyway (a batch
        #: of deliveries, :meth:`apply_acks`) or by :meth:`flush_acks`.
        self._acked: dict[int, tuple[bytes, bytes]] = {}

    # -- mailboxes ------------------------------------------------------------------------

    def add_mailbox(
        self, *, mailbox_id: bytes, local: str, uik_pk: bytes, binding: bytes, now: int
    ) -> None:
        with self.db.transaction() as c:
            if c.execute("SELECT 1 FROM mailboxes WHERE local = ?", (local,)).fetchone():
                raise StoreError(f"This inbox already has a mailbox named '{local}'.")
            c.execute(
                "INSERT INTO mailboxes (mailbox_id, local, uik_pk, binding, device_list,"
                " device_list_version, created_at) VALUES (?, ?, ?, ?, x'', 0, ?)",
                (mailbox_id, local, uik_pk, binding, now),
            )

    def mailbox_by_local(self, local: str) -> MailboxRow | None:
        row = self.db.one("SELECT * FROM mailboxes WHERE local = ?", (local.lower(),))
        return _mailbox(row) if row else None

    def mailbox(self, mailbox_id: bytes) -> MailboxRow | None:
        row = self.db.one("SELECT * FROM mailboxes WHERE mailbox_id = ?", (mailbox_id,))
        return _mailbox(row) if row else None

    def mailboxes(self) -> list[MailboxRow]:
        return [_mailbox(r) for r in self.db.all("SELECT * FROM mailboxes ORDER BY local")]

    def remove_mailbox(self, mailbox_id: bytes) -> None:
        """Delete a mailbox with everything the inbox holds for it: its keys, devices,
        spooled mail, tokens, sessions and duplicate records (the person is being removed).
        Its outbox rows are the outbox component's (``OutboxStore.remove_mailbox``)."""
        with self.db.transaction() as c:
            # devices, rotations, prekeys and tokens go with the mailbox (ON DELETE CASCADE)
            c.execute("DELETE FROM spool WHERE mailbox_id = ?", (mailbox_id,))
            c.execute("DELETE FROM sealed WHERE mailbox_id = ?", (mailbox_id,))
            for table in ("seen_digests", "challenges", "sessions"):
                c.execute(f"DELETE FROM {table} WHERE mailbox_id = ?", (mailbox_id,))  # noqa: S608
            c.execute("DELETE FROM mailboxes WHERE mailbox_id = ?", (mailbox_id,))

    def set_binding(self, mailbox_id: bytes, binding: bytes) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE mailboxes SET binding = ? WHERE mailbox_id = ?", (binding, mailbox_id)
            )

    def set_profile(self, mailbox_id: bytes, profile: bytes | None) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE mailboxes SET profile = ? WHERE mailbox_id = ?", (profile, mailbox_id)
            )

    def set_policy(
        self,
        mailbox_id: bytes,
        *,
        accepts_strangers: bool,
        pow_bits: int | None,
        quota_bytes: int | None,
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE mailboxes SET accepts_strangers = ?, pow_bits = ?, quota_bytes = ?"
                " WHERE mailbox_id = ?",
                (int(accepts_strangers), pow_bits, quota_bytes, mailbox_id),
            )

    def set_device_list(
        self,
        mailbox_id: bytes,
        *,
        device_list: bytes,
        version: int,
        devices: Iterable[tuple[bytes, str, int, bytes]],
        revoked: Iterable[tuple[bytes, int]],
    ) -> int:
        """Install a newer device list; revoked devices lose their spool at once.

        Returns how many spooled copies were dropped.  Refuses a version that is not newer
        (the caller verified the signature; the version check lives here, under the lock).
        """
        with self.db.transaction() as c:
            current = c.execute(
                "SELECT device_list_version FROM mailboxes WHERE mailbox_id = ?", (mailbox_id,)
            ).fetchone()
            if current is None:
                raise StoreError("No such mailbox.")
            if version <= current[0]:
                raise StoreError(
                    f"Device list version {version} is not newer than version {current[0]}."
                )
            c.execute(
                "UPDATE mailboxes SET device_list = ?, device_list_version = ?"
                " WHERE mailbox_id = ?",
                (device_list, version, mailbox_id),
            )
            for device_id, name, seq, pk in devices:
                c.execute(
                    "INSERT INTO devices (mailbox_id, device_id, name, dsk_seq, dsk_pk)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (mailbox_id, device_id) DO UPDATE SET"
                    " name = excluded.name, dsk_seq = max(dsk_seq, excluded.dsk_seq),"
                    " dsk_pk = CASE WHEN excluded.dsk_seq >= dsk_seq THEN excluded.dsk_pk"
                    " ELSE dsk_pk END, revoked_at = NULL",
                    (mailbox_id, device_id, name, seq, pk),
                )
            dropped = 0
            for device_id, revoked_at in revoked:
                c.execute(
                    "INSERT INTO devices (mailbox_id, device_id, name, dsk_seq, dsk_pk, revoked_at)"
                    " VALUES (?, ?, '', 0, x'', ?) ON CONFLICT (mailbox_id, device_id)"
                    " DO UPDATE SET revoked_at = coalesce(revoked_at, excluded.revoked_at)",
                    (mailbox_id, device_id, revoked_at),
                )
                dropped += c.execute(
                    "DELETE FROM spool WHERE mailbox_id = ? AND device_id = ?",
                    (mailbox_id, device_id),
                ).rowcount
                c.execute(
                    "DELETE FROM sessions WHERE mailbox_id = ? AND device_id = ?",
                    (mailbox_id, device_id),
                )
                c.execute(
                    "DELETE FROM prekeys WHERE mailbox_id = ? AND device_id = ?",
                    (mailbox_id, device_id),
                )
            self._drop_orphans(c)
            return dropped

    def devices(self, mailbox_id: bytes, *, include_revoked: bool = False) -> list[DeviceRow]:
        sql = "SELECT * FROM devices WHERE mailbox_id = ?"
        if not include_revoked:
            sql += " AND revoked_at IS NULL"
        return [
            DeviceRow(r["device_id"], r["name"], r["dsk_seq"], r["dsk_pk"], r["revoked_at"])
            for r in self.db.all(sql + " ORDER BY device_id", (mailbox_id,))
        ]

    def device(self, mailbox_id: bytes, device_id: bytes) -> DeviceRow | None:
        r = self.db.one(
            "SELECT * FROM devices WHERE mailbox_id = ? AND device_id = ?", (mailbox_id, device_id)
        )
        if r is None:
            return None
        return DeviceRow(r["device_id"], r["name"], r["dsk_seq"], r["dsk_pk"], r["revoked_at"])

    def advance_device_key(self, mailbox_id: bytes, device_id: bytes, seq: int, pk: bytes) -> None:
        """Record a device's newer signing key after its rotation chain was verified."""
        with self.db.transaction() as c:
            c.execute(
                "UPDATE devices SET dsk_seq = ?, dsk_pk = ? WHERE mailbox_id = ? AND device_id = ?"
                " AND dsk_seq < ?",
                (seq, pk, mailbox_id, device_id, seq),
            )

    def add_rotation(self, mailbox_id: bytes, device_id: bytes, seq: int, record: bytes) -> None:
        with self.db.transaction() as c:
            existing = c.execute(
                "SELECT record FROM rotations WHERE mailbox_id = ? AND device_id = ? AND seq = ?",
                (mailbox_id, device_id, seq),
            ).fetchone()
            if existing is not None:
                if existing[0] != record:
                    raise StoreError("A different key rotation with that number is already known.")
                return
            c.execute(
                "INSERT INTO rotations VALUES (?, ?, ?, ?)", (mailbox_id, device_id, seq, record)
            )

    def rotations(self, mailbox_id: bytes) -> dict[bytes, list[bytes]]:
        out: dict[bytes, list[bytes]] = {}
        for r in self.db.all(
            "SELECT r.device_id, r.record FROM rotations r JOIN devices d USING (mailbox_id,"
            " device_id) WHERE r.mailbox_id = ? AND d.revoked_at IS NULL"
            " ORDER BY r.device_id, r.seq",
            (mailbox_id,),
        ):
            out.setdefault(r["device_id"], []).append(r["record"])
        return out

    def add_prekey(
        self,
        mailbox_id: bytes,
        device_id: bytes,
        *,
        spk_id: int,
        dsk_seq: int,
        record: bytes,
        created_at: int,
        not_after: int,
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO prekeys VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT"
                " (mailbox_id, device_id, spk_id) DO UPDATE SET record = excluded.record,"
                " dsk_seq = excluded.dsk_seq, not_after = excluded.not_after",
                (mailbox_id, device_id, spk_id, dsk_seq, record, created_at, not_after),
            )

    def current_prekeys(self, mailbox_id: bytes, now: int) -> list[bytes]:
        """Each active device's prekeys that have not expired, newest first."""
        return [
            r["record"]
            for r in self.db.all(
                "SELECT p.record FROM prekeys p JOIN devices d USING (mailbox_id, device_id)"
                " WHERE p.mailbox_id = ? AND d.revoked_at IS NULL AND p.not_after >= ?"
                " AND p.dsk_seq = d.dsk_seq ORDER BY p.device_id, p.created_at DESC",
                (mailbox_id, now),
            )
        ]

    def devices_for_prekeys(self, mailbox_id: bytes, spk_ids: Iterable[int]) -> set[bytes]:
        """Active devices that published any of these prekey ids (current or retired)."""
        ids = sorted(set(spk_ids))
        if not ids:
            return set()
        marks = ",".join("?" * len(ids))
        # Only "?" placeholders are interpolated into the statement.
        sql = (
            "SELECT DISTINCT p.device_id FROM prekeys p JOIN devices d USING (mailbox_id,"  # noqa: S608
            " device_id) WHERE p.mailbox_id = ? AND d.revoked_at IS NULL"
            f" AND p.spk_id IN ({marks})"
        )
        rows = self.db.all(sql, (mailbox_id, *ids))
        return {r["device_id"] for r in rows}

    def prune_prekeys(self, before: int) -> int:
        """Forget prekeys that expired long ago (senders can no longer use them)."""
        with self.db.transaction() as c:
            return c.execute("DELETE FROM prekeys WHERE not_after < ?", (before,)).rowcount

    # -- accepting and spooling sealed mail -----------------------------------------------

    def seen(self, mailbox_id: bytes, digest: bytes) -> bool:
        """Whether an envelope with this L2 digest was accepted for the mailbox before."""
        return (
            self.db.one(
                "SELECT 1 FROM seen_digests WHERE mailbox_id = ? AND digest = ?",
                (mailbox_id, self.db.record_hash(digest)),
            )
            is not None
        )

    def spooled(self, mailbox_id: bytes) -> tuple[int, int]:
        """(messages, bytes) waiting at this inbox for the mailbox's devices to fetch (the
        ones every device acknowledged left out, their deletion still to commit)."""
        unacked, hidden = self._unacked()
        row = self.db.one(
            "SELECT count(*), coalesce(sum(size), 0) FROM sealed"  # noqa: S608 (only ?s)
            f" WHERE mailbox_id = ?{unacked}",
            (mailbox_id, *hidden),
        )
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def usage(self, mailbox_id: bytes) -> int:
        """Bytes of sealed mail the mailbox holds, the envelopes every device acknowledged
        left out (their deletion still to commit).  One row (``mailbox_usage``, kept by
        triggers) and the few envelopes waiting for deletion: never a sum over the backlog."""
        used = self._used(mailbox_id)
        hidden = tuple(self._acked)
        if not hidden:
            return used
        marks = ",".join("?" * len(hidden))
        waiting = self.db.scalar(
            "SELECT coalesce(sum(size), 0) FROM sealed WHERE mailbox_id = ? AND id IN"  # noqa: S608
            f" (SELECT sealed_id FROM spool WHERE id IN ({marks})) AND NOT EXISTS"
            f" (SELECT 1 FROM spool s WHERE s.sealed_id = sealed.id AND s.id NOT IN ({marks}))",
            (mailbox_id, *hidden, *hidden),
        )
        return used - int(waiting)

    def _used(self, mailbox_id: bytes) -> int:
        row = self.db.one("SELECT bytes FROM mailbox_usage WHERE mailbox_id = ?", (mailbox_id,))
        return int(row[0]) if row else 0

    def _unacked(self) -> tuple[str, tuple[int, ...]]:
        """SQL on ``sealed`` (and its parameters) that leaves out the envelopes every device
        acknowledged whose deletion waits for the next commit (:meth:`acknowledge_later`)."""
        hidden = tuple(self._acked)
        if not hidden:
            return "", ()
        marks = ",".join("?" * len(hidden))
        sql = " AND EXISTS (SELECT 1 FROM spool s WHERE s.sealed_id = sealed.id AND s.id NOT IN "
        return f"{sql}({marks}))", hidden

    def accept_sealed(
        self,
        *,
        mailbox_id: bytes,
        digest: bytes,
        size: int,
        source: Readable,
        device_ids: Iterable[bytes],
        receipt: str,
        now: int,
        spool_until: int,
        dedup_until: int,
        quota_bytes: int,
    ) -> Accepted:
        """Store an L2 and spool it for ``device_ids``; committed durably before returning
        (with the caller's transaction when called inside one: :meth:`Inbox.accept` commits
        the rate charge with it).

        ``receipt`` is derived from the digest by the caller, so a duplicate gets the same
        one without the inbox storing it.  Expired mail is pruned first when the quota would
        be exceeded, so a full mailbox refuses only when live mail fills it.
        """
        digest = self.db.record_hash(digest)
        # usage() <= _used(): the precise figure (a query over the acknowledged envelopes
        # still to delete) is needed only when the stored one says the mail would not fit.
        if quota.refusal(
            used=self._used(mailbox_id), size=size, quota=quota_bytes
        ) and quota.refusal(used=self.usage(mailbox_id), size=size, quota=quota_bytes):
            self.prune(now)
        with self.db.transaction() as c:
            seen = c.execute(
                "SELECT 1 FROM seen_digests WHERE mailbox_id = ? AND digest = ?",
                (mailbox_id, digest),
            ).fetchone()
            if seen is not None:
                return Accepted(receipt, duplicate=True)
            full = quota.refusal(used=self._used(mailbox_id), size=size, quota=quota_bytes)
            if full is not None:
                raise full
            cur = c.execute(
                "INSERT INTO sealed (mailbox_id, digest, size, received_at, expires_at, data)"
                " VALUES (?, ?, ?, ?, ?, zeroblob(?))",
                (mailbox_id, digest, size, now, spool_until, size),
            )
            sealed_id = cur.lastrowid
            assert sealed_id is not None
            self._write_blob(c, sealed_id, size, source)
            for device_id in sorted(set(device_ids)):
                c.execute(
                    "INSERT INTO spool (sealed_id, mailbox_id, device_id, added_at)"
                    " VALUES (?, ?, ?, ?)",
                    (sealed_id, mailbox_id, device_id, now),
                )
            c.execute(
                "INSERT INTO seen_digests (mailbox_id, digest, expires_at) VALUES (?, ?, ?)",
                (mailbox_id, digest, dedup_until),
            )
        return Accepted(receipt, duplicate=False)

    @staticmethod
    def _write_blob(c: sqlite3.Connection, rowid: int, size: int, source: Readable) -> None:
        try:
            with c.blobopen("sealed", "data", rowid) as blob:
                left = size
                while left:
                    piece = source.read(min(BLOB_CHUNK, left))
                    if not piece:
                        raise StoreError("The message to store ended early.")
                    blob.write(piece)
                    left -= len(piece)
        except sqlite3.Error as exc:
            raise translate(exc) from exc

    def pending(
        self,
        mailbox_id: bytes,
        device_id: bytes,
        *,
        after: int = 0,
        limit: int = PENDING_LIST_MAX,
    ) -> list[SpoolEntry]:
        """The device's spooled copies, oldest first (the acknowledged ones left out)."""
        hidden = self._acked
        return [
            SpoolEntry(r["id"], r["size"], r["received_at"])
            for r in self.db.all(
                "SELECT s.id, m.size, m.received_at FROM spool s JOIN sealed m"
                " ON m.id = s.sealed_id WHERE s.mailbox_id = ? AND s.device_id = ? AND s.id > ?"
                " ORDER BY s.id LIMIT ?",
                (mailbox_id, device_id, after, limit + len(hidden)),
            )
            if r["id"] not in hidden
        ][:limit]

    def read_spooled(
        self, mailbox_id: bytes, device_id: bytes, spool_id: int
    ) -> tuple[int, Iterator[bytes]] | None:
        """(size, chunks) of one spooled envelope, streamed from the database."""
        if spool_id in self._acked:
            return None
        row = self.db.one(
            "SELECT m.id, m.size FROM spool s JOIN sealed m ON m.id = s.sealed_id"
            " WHERE s.id = ? AND s.mailbox_id = ? AND s.device_id = ?",
            (spool_id, mailbox_id, device_id),
        )
        if row is None:
            return None
        sealed_id, size = int(row["id"]), int(row["size"])

        def chunks() -> Iterator[bytes]:
            try:
                with self.db.conn.blobopen("sealed", "data", sealed_id, readonly=True) as blob:
                    while piece := blob.read(BLOB_CHUNK):
                        yield piece
            except sqlite3.Error as exc:
                raise translate(exc) from exc

        return size, chunks()

    def acknowledge(self, mailbox_id: bytes, device_id: bytes, spool_ids: Iterable[int]) -> int:
        """Drop this device's copies; an envelope no device still needs is deleted."""
        ids = sorted(set(spool_ids))
        if not ids:
            return 0
        with self.db.transaction() as c:
            marks = ",".join("?" * len(ids))
            freed = c.execute(
                f"DELETE FROM spool WHERE mailbox_id = ? AND device_id = ? AND id IN ({marks})"  # noqa: S608
                " RETURNING sealed_id",
                (mailbox_id, device_id, *ids),
            ).fetchall()
            candidates = sorted({r[0] for r in freed})
            if candidates:
                marks = ",".join("?" * len(candidates))
                c.execute(
                    f"DELETE FROM sealed WHERE id IN ({marks}) AND NOT EXISTS"  # noqa: S608
                    " (SELECT 1 FROM spool WHERE sealed_id = sealed.id)",
                    candidates,
                )
            return len(freed)

    def acknowledge_later(
        self, mailbox_id: bytes, device_id: bytes, spool_ids: Iterable[int]
    ) -> int:
        """:meth:`acknowledge`, the deletion riding the next commit (:meth:`apply_acks`):
        the copies are hidden from this device at once.  How many were still spooled for it.

        Nothing depends on the deletion being durable: the device acknowledges only what it
        holds durably (in the mailbox), and an acknowledgement lost with a crash only offers
        the message again, which the device recognises by its message id and acknowledges
        without filing it twice."""
        ids = sorted(set(spool_ids) - self._acked.keys())
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        found = [
            int(r[0])
            for r in self.db.all(
                f"SELECT id FROM spool WHERE mailbox_id = ? AND device_id = ? AND id IN ({marks})",  # noqa: S608
                (mailbox_id, device_id, *ids),
            )
        ]
        for spool_id in found:
            self._acked[spool_id] = (mailbox_id, device_id)
        return len(found)

    def acks_waiting(self) -> int:
        """How many acknowledged copies wait for their deletion to be committed."""
        return len(self._acked)

    def apply_acks(self) -> dict[int, tuple[bytes, bytes]]:
        """Delete the acknowledged copies inside the caller's transaction; hand what this
        returns to :meth:`acks_applied` after its COMMIT (a rollback keeps them waiting)."""
        taken = dict(self._acked)
        by_device: dict[tuple[bytes, bytes], list[int]] = {}
        for spool_id, who in taken.items():
            by_device.setdefault(who, []).append(spool_id)
        with self.db.transaction():
            for (mailbox_id, device_id), ids in by_device.items():
                self.acknowledge(mailbox_id, device_id, ids)
        return taken

    def acks_applied(self, taken: dict[int, tuple[bytes, bytes]]) -> None:
        for spool_id in taken:
            self._acked.pop(spool_id, None)

    def flush_acks(self) -> int:
        """Commit the deletion of every acknowledged copy still waiting; how many."""
        if not self._acked:
            return 0
        with self.db.transaction():
            taken = self.apply_acks()
        self.acks_applied(taken)
        return len(taken)

    @staticmethod
    def _drop_orphans(c: sqlite3.Connection) -> None:
        c.execute(
            "DELETE FROM sealed WHERE NOT EXISTS (SELECT 1 FROM spool WHERE sealed_id = sealed.id)"
        )

    def prune(self, now: int) -> dict[str, int]:
        """Remove what has outlived its purpose; returns counts by kind."""
        with self.db.transaction() as c:
            out = {
                "sealed": c.execute("DELETE FROM sealed WHERE expires_at < ?", (now,)).rowcount,
                "seen": c.execute("DELETE FROM seen_digests WHERE expires_at < ?", (now,)).rowcount,
                "challenges": c.execute(
                    "DELETE FROM challenges WHERE expires_at < ?", (now,)
                ).rowcount,
                "sessions": c.execute("DELETE FROM sessions WHERE expires_at < ?", (now,)).rowcount,
                "rates": c.execute(
                    "DELETE FROM rate_counters WHERE window_start < ?", (now - 2 * 86_400,)
                ).rowcount,
            }
            return out

    # -- contact tokens -------------------------------------------------------------------

    def add_token(self, mailbox_id: bytes, token_hash: bytes, now: int) -> None:
        """Accept a contact token (its keyed hash); whose it is, the inbox is not told."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO tokens (mailbox_id, token_hash, created_at) VALUES"
                " (?, ?, ?) ON CONFLICT DO UPDATE SET revoked_at = NULL",
                (mailbox_id, token_hash, now),
            )

    def token_valid(self, mailbox_id: bytes, token_hash: bytes) -> bool:
        return (
            self.db.one(
                "SELECT 1 FROM tokens WHERE mailbox_id = ? AND token_hash = ?"
                " AND revoked_at IS NULL",
                (mailbox_id, token_hash),
            )
            is not None
        )

    def revoke_token(self, mailbox_id: bytes, token_hash: bytes, now: int) -> bool:
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE tokens SET revoked_at = ? WHERE mailbox_id = ? AND token_hash = ?"
                    " AND revoked_at IS NULL",
                    (now, mailbox_id, token_hash),
                ).rowcount
                > 0
            )

    # -- rate limits ----------------------------------------------------------------------

    def take_rate(self, scope: str, key: bytes, window_start: int, limit: int) -> bool:
        """Count one event in a fixed window; False once ``limit`` events were counted."""
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT count FROM rate_counters WHERE scope = ? AND key = ? AND window_start = ?",
                (scope, key, window_start),
            ).fetchone()
            count = row[0] if row else 0
            if count >= limit:
                return False
            c.execute(
                "INSERT INTO rate_counters VALUES (?, ?, ?, 1) ON CONFLICT DO UPDATE"
                " SET count = count + 1",
                (scope, key, window_start),
            )
            return True

    def take_rates(self, buckets: Iterable[RateBucket], window_start: int) -> RateBucket | None:
        """Count one event in every bucket, or in none: returns the first full bucket.

        All or nothing, so an event refused by one limit does not use up another (a
        contact refused by the mailbox's budget keeps its own token budget).  One statement
        per bucket on every delivery: the upsert counts only below the limit and says
        whether it did; a full bucket rolls back the ones counted before it.
        """
        try:
            with self.db.transaction() as c:
                for b in buckets:
                    counted = (
                        b.limit > 0
                        and c.execute(
                            "INSERT INTO rate_counters VALUES (?, ?, ?, 1) ON CONFLICT DO UPDATE"
                            " SET count = count + 1 WHERE count < ? RETURNING count",
                            (b.scope, b.key, window_start, b.limit),
                        ).fetchone()
                    )
                    if not counted:
                        raise _BucketFull(b)
        except _BucketFull as full:
            return full.bucket
        return None

    def rate_count(self, scope: str, key: bytes, window_start: int) -> int:
        """Events counted so far in a window (without counting one)."""
        v = self.db.scalar(
            "SELECT count FROM rate_counters WHERE scope = ? AND key = ? AND window_start = ?",
            (scope, key, window_start),
        )
        return int(v or 0)

    # -- device login ---------------------------------------------------------------------

    def add_challenge(
        self, challenge: bytes, mailbox_id: bytes, device_id: bytes, expires_at: int
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO challenges VALUES (?, ?, ?, ?)",
                (challenge, mailbox_id, device_id, expires_at),
            )

    def take_challenge(
        self, challenge: bytes, mailbox_id: bytes, device_id: bytes, now: int
    ) -> bool:
        """Consume a challenge: true once, only if it was issued to this device and is fresh."""
        with self.db.transaction() as c:
            row = c.execute(
                "DELETE FROM challenges WHERE challenge = ? RETURNING mailbox_id, device_id,"
                " expires_at",
                (challenge,),
            ).fetchone()
        return row is not None and row[0] == mailbox_id and row[1] == device_id and row[2] >= now

    def add_session(
        self, token_hash: bytes, mailbox_id: bytes, device_id: bytes, expires_at: int
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?)",
                (token_hash, mailbox_id, device_id, expires_at),
            )

    def session(self, token_hash: bytes, now: int) -> tuple[bytes, bytes] | None:
        row = self.db.one(
            "SELECT s.mailbox_id, s.device_id FROM sessions s JOIN devices d USING (mailbox_id,"
            " device_id) WHERE s.token_hash = ? AND s.expires_at >= ? AND d.revoked_at IS NULL",
            (token_hash, now),
        )
        return None if row is None else (row[0], row[1])
