"""A user's address book: who a contact is (pinned identity key) and how to reach them.

A contact's identity key is pinned the first time we see it, from a bundle fetched from the
contact's own onion or from a message whose credentials verified.  Later bundles and
messages must agree with the pin; a change is recorded in ``identity_changes`` and refused
until the user accepts it (``onionpost contacts trust``).

Every row belongs to one local user: the people of a household share a device database but
not their contacts.  Tokens in particular are per person (the token we grant a contact is
registered at *our* mailbox, the one they grant us is for *us*), so a :class:`ContactStore`
is a view of one user's rows and cannot reach anyone else's.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from onionpost.store.db import Database


@dataclass(frozen=True)
class Contact:
    address: str
    uik_pk: bytes
    pin: bytes
    device_list: bytes | None
    bundle: bytes | None
    bundle_fetched_at: int | None
    token_to_them: bytes | None
    token_from_them: bytes | None
    display_name: str
    first_seen: int
    last_seen: int
    verified: bool
    blocked: bool


def _contact(r: sqlite3.Row) -> Contact:
    return Contact(
        r["address"],
        r["uik_pk"],
        r["pin"],
        r["device_list"],
        r["bundle"],
        r["bundle_fetched_at"],
        r["token_to_them"],
        r["token_from_them"],
        r["display_name"],
        r["first_seen"],
        r["last_seen"],
        bool(r["verified"]),
        bool(r["blocked"]),
    )


class ContactStore:
    """The contacts of ``user`` (the local part of one of this device's users)."""

    def __init__(self, db: Database, user: str) -> None:
        self.db = db
        self.user = user

    def get(self, address: str) -> Contact | None:
        r = self.db.one(
            "SELECT * FROM contacts WHERE user = ? AND address = ?", (self.user, address)
        )
        return _contact(r) if r else None

    def all(self) -> list[Contact]:
        return [
            _contact(r)
            for r in self.db.all(
                "SELECT * FROM contacts WHERE user = ? ORDER BY address", (self.user,)
            )
        ]

    def remember(
        self,
        address: str,
        *,
        uik_pk: bytes,
        pin: bytes,
        now: int,
        device_list: bytes | None = None,
        bundle: bytes | None = None,
        display_name: str | None = None,
    ) -> None:
        """Create or advance a contact; the caller has verified everything against the pin."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO contacts (user, address, uik_pk, pin, device_list, bundle,"
                " bundle_fetched_at, display_name, first_seen, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, coalesce(?, ''), ?, ?)"
                " ON CONFLICT (user, address) DO UPDATE SET pin = excluded.pin,"
                " device_list = coalesce(excluded.device_list, device_list),"
                " bundle = coalesce(excluded.bundle, bundle),"
                " bundle_fetched_at = coalesce(excluded.bundle_fetched_at, bundle_fetched_at),"
                " display_name = CASE WHEN ? IS NULL THEN display_name ELSE excluded.display_name"
                " END, last_seen = excluded.last_seen WHERE uik_pk = excluded.uik_pk",
                (
                    self.user,
                    address,
                    uik_pk,
                    pin,
                    device_list,
                    bundle,
                    now if bundle else None,
                    display_name,
                    now,
                    now,
                    display_name,
                ),
            )

    def set_profile(self, address: str, display_name: str, issued_at: int) -> bool:
        """Record the display name of a profile that verified for this contact's pinned
        identity; an older profile than the one recorded is ignored (False).  An empty name
        (the contact cleared their profile) clears the recorded one."""
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE contacts SET display_name = ?, profile_issued_at = ?"
                    " WHERE user = ? AND address = ? AND profile_issued_at <= ?",
                    (display_name, issued_at, self.user, address, issued_at),
                ).rowcount
                > 0
            )

    def set_token_to_them(self, address: str, token: bytes) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE contacts SET token_to_them = ? WHERE user = ? AND address = ?"
                " AND token_to_them IS NOT ?",
                (token, self.user, address, token),
            )

    def set_token_from_them(self, address: str, token: bytes | None) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE contacts SET token_from_them = ? WHERE user = ? AND address = ?",
                (token, self.user, address),
            )

    def set_flags(
        self, address: str, *, verified: bool | None = None, blocked: bool | None = None
    ) -> bool:
        with self.db.transaction() as c:
            n = 0
            if verified is not None:
                n += c.execute(
                    "UPDATE contacts SET verified = ? WHERE user = ? AND address = ?",
                    (int(verified), self.user, address),
                ).rowcount
            if blocked is not None:
                n += c.execute(
                    "UPDATE contacts SET blocked = ? WHERE user = ? AND address = ?",
                    (int(blocked), self.user, address),
                ).rowcount
            return n > 0

    def block(self, address: str) -> tuple[bool, bytes | None]:
        """Mark a contact blocked; returns the token we registered for them (if any), which
        the caller withdraws at our inbox.  The token is kept, so a withdrawal that could
        not reach the inbox can be repeated, and it is never granted again (see
        :meth:`unblock`).  ``(False, None)``, and nothing changed, if the address is not a
        contact."""
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT token_from_them FROM contacts WHERE user = ? AND address = ?",
                (self.user, address),
            ).fetchone()
            if row is None:
                return False, None
            c.execute(
                "UPDATE contacts SET blocked = 1 WHERE user = ? AND address = ?",
                (self.user, address),
            )
            token: bytes | None = row["token_from_them"]
            return True, token

    def unblock(self, address: str) -> bool:
        """Lift a block.  Nothing is restored: the withdrawn token is forgotten, so the
        contact writes as a stranger until we write to them (which grants a fresh token)."""
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE contacts SET blocked = 0, token_from_them = NULL"
                    " WHERE user = ? AND address = ?",
                    (self.user, address),
                ).rowcount
                > 0
            )

    def is_blocked(self, address: str) -> bool:
        r = self.db.one(
            "SELECT blocked FROM contacts WHERE user = ? AND address = ?", (self.user, address)
        )
        return bool(r and r["blocked"])

    def forget_token_to_them(self, address: str, token: bytes) -> None:
        """Their inbox refused the token they gave us: write as a stranger from now on."""
        with self.db.transaction() as c:
            c.execute(
                "UPDATE contacts SET token_to_them = NULL WHERE user = ? AND address = ?"
                " AND token_to_them = ?",
                (self.user, address, token),
            )

    def remember_policy(self, accepts_strangers: bool, now: int) -> None:
        """Record what this person last told their inbox about strangers (for status)."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO mail_policy (user, accepts_strangers, set_at) VALUES (?, ?, ?)"
                " ON CONFLICT (user) DO UPDATE SET accepts_strangers = excluded.accepts_strangers,"
                " set_at = excluded.set_at",
                (self.user, int(accepts_strangers), now),
            )

    def remembered_policy(self) -> bool | None:
        """What :meth:`remember_policy` recorded; None if the person never set it here."""
        r = self.db.one("SELECT accepts_strangers FROM mail_policy WHERE user = ?", (self.user,))
        return None if r is None else bool(r["accepts_strangers"])

    def forget(self, address: str) -> bool:
        with self.db.transaction() as c:
            return (
                c.execute(
                    "DELETE FROM contacts WHERE user = ? AND address = ?", (self.user, address)
                ).rowcount
                > 0
            )

    def forget_all(self) -> int:
        """Delete this user's whole address book (the user is being removed)."""
        with self.db.transaction() as c:
            c.execute("DELETE FROM identity_changes WHERE user = ?", (self.user,))
            c.execute("DELETE FROM mail_policy WHERE user = ?", (self.user,))
            c.execute("DELETE FROM introductions WHERE user = ?", (self.user,))
            return int(c.execute("DELETE FROM contacts WHERE user = ?", (self.user,)).rowcount)

    def record_identity_change(
        self, address: str, old_uik: bytes, new_uik: bytes, now: int
    ) -> None:
        with self.db.transaction() as c:
            exists = c.execute(
                "SELECT 1 FROM identity_changes WHERE user = ? AND address = ? AND new_uik = ?"
                " AND resolved_at IS NULL",
                (self.user, address, new_uik),
            ).fetchone()
            if not exists:
                c.execute(
                    "INSERT INTO identity_changes (user, address, old_uik, new_uik, seen_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (self.user, address, old_uik, new_uik, now),
                )

    def pending_identity_changes(self) -> list[tuple[str, bytes, bytes, int]]:
        return [
            (r["address"], r["old_uik"], r["new_uik"], r["seen_at"])
            for r in self.db.all(
                "SELECT * FROM identity_changes WHERE user = ? AND resolved_at IS NULL ORDER BY id",
                (self.user,),
            )
        ]

    def accept_identity(self, address: str, now: int) -> bool:
        """The user accepts a contact's new identity: forget the old pin entirely."""
        with self.db.transaction() as c:
            n = c.execute(
                "UPDATE identity_changes SET resolved_at = ? WHERE user = ? AND address = ?"
                " AND resolved_at IS NULL",
                (now, self.user, address),
            ).rowcount
            c.execute("DELETE FROM contacts WHERE user = ? AND address = ?", (self.user, address))
            return n > 0
