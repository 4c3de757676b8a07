"""Inbox-side storage for invites and device pairings (the ``enrolment`` component).

Codes are single-use by construction: an invite row is marked used in the same transaction
that opens its mailbox, and a pairing slot moves ``offered -> joined -> granted`` with each
step a conditional update, so two racing uses of one code cannot both succeed.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from onionpost.store.db import Database


@dataclass(frozen=True)
class InviteRow:
    claim_hash: bytes
    local: str
    created_at: int
    expires_at: int
    quota_bytes: int | None
    max_devices: int | None
    used_at: int | None
    mailbox_id: bytes | None
    uik_pk: bytes | None


@dataclass(frozen=True)
class PairingRow:
    slot: bytes
    mailbox_id: bytes
    device_id: bytes
    offer: bytes
    join_pk: bytes | None
    join_box: bytes | None
    grant_box: bytes | None
    state: str
    created_at: int
    expires_at: int


def _invite(r: sqlite3.Row) -> InviteRow:
    return InviteRow(
        r["claim_hash"],
        r["local"],
        r["created_at"],
        r["expires_at"],
        r["quota_bytes"],
        r["max_devices"],
        r["used_at"],
        r["mailbox_id"],
        r["uik_pk"],
    )


def _pairing(r: sqlite3.Row) -> PairingRow:
    return PairingRow(
        r["slot"],
        r["mailbox_id"],
        r["device_id"],
        r["offer"],
        r["join_pk"],
        r["join_box"],
        r["grant_box"],
        r["state"],
        r["created_at"],
        r["expires_at"],
    )


class EnrolmentStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- invites --------------------------------------------------------------------------

    def add_invite(
        self,
        claim_hash: bytes,
        *,
        local: str,
        now: int,
        expires_at: int,
        quota_bytes: int | None,
        max_devices: int | None,
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO invites (claim_hash, local, created_at, expires_at, quota_bytes,"
                " max_devices) VALUES (?, ?, ?, ?, ?, ?)",
                (claim_hash, local, now, expires_at, quota_bytes, max_devices),
            )

    def invite(self, claim_hash: bytes) -> InviteRow | None:
        r = self.db.one("SELECT * FROM invites WHERE claim_hash = ?", (claim_hash,))
        return _invite(r) if r else None

    def open_invites(self, now: int) -> list[InviteRow]:
        return [
            _invite(r)
            for r in self.db.all(
                "SELECT * FROM invites WHERE used_at IS NULL AND expires_at > ?"
                " ORDER BY created_at",
                (now,),
            )
        ]

    def invite_pending_for(self, local: str, now: int) -> bool:
        return (
            self.db.one(
                "SELECT 1 FROM invites WHERE local = ? AND used_at IS NULL AND expires_at > ?",
                (local, now),
            )
            is not None
        )

    def use_invite(self, claim_hash: bytes, mailbox_id: bytes, uik_pk: bytes, now: int) -> bool:
        """Mark an open invite used (call inside the transaction that opens the mailbox)."""
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE invites SET used_at = ?, mailbox_id = ?, uik_pk = ?"
                    " WHERE claim_hash = ? AND used_at IS NULL AND expires_at > ?",
                    (now, mailbox_id, uik_pk, claim_hash, now),
                ).rowcount
                == 1
            )

    def withdraw_invites(self, local: str) -> int:
        with self.db.transaction() as c:
            return c.execute(
                "DELETE FROM invites WHERE local = ? AND used_at IS NULL", (local,)
            ).rowcount

    # -- per-mailbox limits and device activity -------------------------------------------

    def set_max_devices(self, mailbox_id: bytes, max_devices: int | None) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO mailbox_limits VALUES (?, ?) ON CONFLICT (mailbox_id)"
                " DO UPDATE SET max_devices = excluded.max_devices",
                (mailbox_id, max_devices),
            )

    def max_devices(self, mailbox_id: bytes) -> int | None:
        v = self.db.scalar(
            "SELECT max_devices FROM mailbox_limits WHERE mailbox_id = ?", (mailbox_id,)
        )
        return None if v is None else int(v)

    def touch_device(self, mailbox_id: bytes, device_id: bytes, now: int) -> None:
        """Record that a device talked to its inbox (at most one write a minute each)."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO device_seen VALUES (?, ?, ?) ON CONFLICT (mailbox_id, device_id)"
                " DO UPDATE SET seen_at = excluded.seen_at WHERE seen_at < excluded.seen_at - 60",
                (mailbox_id, device_id, now),
            )

    def devices_seen(self, mailbox_id: bytes) -> dict[bytes, int]:
        return {
            r["device_id"]: r["seen_at"]
            for r in self.db.all("SELECT * FROM device_seen WHERE mailbox_id = ?", (mailbox_id,))
        }

    # -- pairings -------------------------------------------------------------------------

    def add_pairing(
        self,
        slot: bytes,
        *,
        mailbox_id: bytes,
        device_id: bytes,
        offer: bytes,
        now: int,
        expires_at: int,
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO pairings (slot, mailbox_id, device_id, offer, created_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (slot, mailbox_id, device_id, offer, now, expires_at),
            )

    def pairing(self, slot: bytes) -> PairingRow | None:
        r = self.db.one("SELECT * FROM pairings WHERE slot = ?", (slot,))
        return _pairing(r) if r else None

    def join_pairing(self, slot: bytes, join_pk: bytes, box: bytes, now: int) -> bool:
        """The new device's request; only the first one into an open slot counts."""
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE pairings SET join_pk = ?, join_box = ?, state = 'joined'"
                    " WHERE slot = ? AND state = 'offered' AND expires_at > ?",
                    (join_pk, box, slot, now),
                ).rowcount
                == 1
            )

    def finish_pairing(self, slot: bytes, state: str, grant_box: bytes | None, now: int) -> bool:
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE pairings SET state = ?, grant_box = ? WHERE slot = ?"
                    " AND state IN ('offered', 'joined') AND expires_at > ?",
                    (state, grant_box, slot, now),
                ).rowcount
                == 1
            )

    def prune(self, now: int) -> int:
        """Forget expired codes (used invites are kept a day to answer a retried redeem)."""
        with self.db.transaction() as c:
            n = c.execute("DELETE FROM pairings WHERE expires_at <= ?", (now,)).rowcount
            n += c.execute(
                "DELETE FROM invites WHERE (used_at IS NULL AND expires_at <= ?) OR used_at <= ?",
                (now, now - 86_400),
            ).rowcount
            return n
