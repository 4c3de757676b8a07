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
    invited_by: bytes | None = None  # the issuing mailbox; None: the admin
    can_invite: int = 0


@dataclass(frozen=True)
class ChainRow:
    """A mailbox's place in the invite chain (see :mod:`onionpost.core.chain`)."""

    mailbox_id: bytes
    invited_by: bytes | None
    allowance: int
    joined_at: int


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
        r["invited_by"],
        r["can_invite"],
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
        invited_by: bytes | None = None,
        can_invite: int = 0,
    ) -> None:
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO invites (claim_hash, local, created_at, expires_at, quota_bytes,"
                " max_devices, invited_by, can_invite) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    claim_hash,
                    local,
                    now,
                    expires_at,
                    quota_bytes,
                    max_devices,
                    invited_by,
                    can_invite,
                ),
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

    # -- the invite chain -----------------------------------------------------------------

    def chain(self) -> list[ChainRow]:
        return [
            ChainRow(r["mailbox_id"], r["invited_by"], r["allowance"], r["joined_at"])
            for r in self.db.all("SELECT * FROM chain")
        ]

    def reserved(self, now: int) -> dict[bytes, int]:
        """What each member's open invites hold of their allowance (``1 + can_invite`` each)."""
        return {
            r["invited_by"]: int(r["held"])
            for r in self.db.all(
                "SELECT invited_by, sum(1 + can_invite) AS held FROM invites"
                " WHERE invited_by IS NOT NULL AND used_at IS NULL AND expires_at > ?"
                " GROUP BY invited_by",
                (now,),
            )
        }

    def join_chain(
        self, mailbox_id: bytes, *, invited_by: bytes | None, allowance: int, now: int
    ) -> None:
        """Record who invited a new mailbox and what it may hand on (in the redeem's
        transaction); the inviter's allowance pays for it (:meth:`spend`)."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO chain VALUES (?, ?, ?, ?) ON CONFLICT (mailbox_id) DO UPDATE SET"
                " invited_by = excluded.invited_by, allowance = excluded.allowance",
                (mailbox_id, invited_by, allowance, now),
            )

    def spend(self, mailbox_id: bytes, cost: int) -> bool:
        """Take ``cost`` from a member's allowance; False (and nothing taken) if too little."""
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE chain SET allowance = allowance - ? WHERE mailbox_id = ?"
                    " AND allowance >= ?",
                    (cost, mailbox_id, cost),
                ).rowcount
                == 1
            )

    def reparent(self, mailbox_ids: list[bytes], invited_by: bytes | None, now: int) -> None:
        with self.db.transaction() as c:
            for mid in mailbox_ids:
                c.execute(
                    "INSERT INTO chain VALUES (?, ?, 0, ?) ON CONFLICT (mailbox_id)"
                    " DO UPDATE SET invited_by = excluded.invited_by",
                    (mid, invited_by, now),
                )

    def forget_mailbox(self, mailbox_id: bytes) -> int:
        """Drop what this component holds for a removed mailbox: its place in the chain, its
        limits, device activity and pairings, and the open invites it issued (returns how
        many of those were withdrawn)."""
        with self.db.transaction() as c:
            for table in ("chain", "mailbox_limits", "device_seen", "pairings"):
                c.execute(f"DELETE FROM {table} WHERE mailbox_id = ?", (mailbox_id,))  # noqa: S608
            return c.execute(
                "DELETE FROM invites WHERE invited_by = ? AND used_at IS NULL", (mailbox_id,)
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
