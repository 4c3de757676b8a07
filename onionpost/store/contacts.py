"""A user's address book: who a contact is (pinned identity key) and how to reach them.

A contact's identity key is pinned the first time we see it, from a bundle fetched from the
contact's own onion or from a message whose credentials verified.  Later bundles and
messages must agree with the pin.  A different identity key is recorded in
``identity_changes`` with what was verified of it; mail signed by it is held in Quarantine
(see :mod:`onionpost.device.sync`) until the person compares fingerprints and runs ``onionpost
contacts accept-key ADDR FINGERPRINT`` (pins the new key if the typed fingerprint is its
own) or ``contacts reject-key ADDR`` (keeps the old pin; the new key's mail is refused).

Every row belongs to one local user: the people of a household share a device database but
not their contacts.  Tokens in particular are per person (the token we grant a contact is
registered at *our* mailbox, the one they grant us is for *us*), so a :class:`ContactStore`
is a view of one user's rows and cannot reach anyone else's.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from onionpost.core.crypto.bundle import Pin
from onionpost.core.crypto.sender import pin_encode
from onionpost.core.errors import FingerprintMismatch, UsageError
from onionpost.core.trust import check_typed, fingerprint_matches
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


@dataclass(frozen=True)
class IdentityChange:
    """A contact presented an identity key other than the pinned one."""

    id: int
    address: str
    old_uik: bytes
    new_uik: bytes
    seen_at: int
    #: The verified pin of the new key (None for a change recorded before contacts
    #: migration 0006).
    new_pin: bytes | None
    new_device_list: bytes | None
    new_bundle: bytes | None
    #: How many messages signed by the new key were held in Quarantine.
    held: int
    noticed: bool
    #: None while pending; "accepted" or "rejected".
    outcome: str | None

    @property
    def pending(self) -> bool:
        return self.outcome is None


def _change(r: sqlite3.Row) -> IdentityChange:
    return IdentityChange(
        r["id"],
        r["address"],
        r["old_uik"],
        r["new_uik"],
        r["seen_at"],
        r["new_pin"],
        r["new_device_list"],
        r["new_bundle"],
        r["held"],
        bool(r["noticed"]),
        r["outcome"],
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
        self.db.write(
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
        return (
            self.db.write(
                "UPDATE contacts SET display_name = ?, profile_issued_at = ?"
                " WHERE user = ? AND address = ? AND profile_issued_at <= ?",
                (display_name, issued_at, self.user, address, issued_at),
            ).rowcount
            > 0
        )

    def set_token_to_them(self, address: str, token: bytes) -> None:
        self.db.write(
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
        self,
        address: str,
        old_uik: bytes,
        new_uik: bytes,
        now: int,
        *,
        new_pin: bytes | None = None,
        device_list: bytes | None = None,
        bundle: bytes | None = None,
        held: bool = False,
    ) -> IdentityChange:
        """Record that ``address`` presented ``new_uik`` instead of the pinned ``old_uik``,
        with what was verified of the new key (``new_pin``, ``device_list``, ``bundle``: the
        caller checked every signature against the new key), and count a ``held`` message.

        Returns the change as it stands: pending (a new or the existing row), or rejected if
        the person already rejected this key while ``old_uik`` stayed pinned, in which case
        nothing is updated and the caller refuses the mail.
        """
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT * FROM identity_changes WHERE user = ? AND address = ? AND new_uik = ?"
                " AND old_uik = ? AND (resolved_at IS NULL OR outcome = 'rejected')"
                " ORDER BY resolved_at IS NOT NULL, id DESC LIMIT 1",
                (self.user, address, new_uik, old_uik),
            ).fetchone()
            if row is not None and row["outcome"] == "rejected":
                return _change(row)
            if row is None:
                change_id = c.execute(
                    "INSERT INTO identity_changes (user, address, old_uik, new_uik, seen_at,"
                    " new_pin, new_device_list, new_bundle, held)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        self.user,
                        address,
                        old_uik,
                        new_uik,
                        now,
                        new_pin,
                        device_list,
                        bundle,
                        int(held),
                    ),
                ).lastrowid
            else:
                change_id = row["id"]
                c.execute(
                    "UPDATE identity_changes SET new_pin = coalesce(?, new_pin),"
                    " new_device_list = coalesce(?, new_device_list),"
                    " new_bundle = coalesce(?, new_bundle), held = held + ? WHERE id = ?",
                    (new_pin, device_list, bundle, int(held), change_id),
                )
            got = c.execute("SELECT * FROM identity_changes WHERE id = ?", (change_id,)).fetchone()
            return _change(got)

    def pending_change(self, address: str, new_uik: bytes) -> IdentityChange | None:
        """The pending (unresolved) change of ``address`` to ``new_uik``, if any."""
        r = self.db.one(
            "SELECT * FROM identity_changes WHERE user = ? AND address = ? AND new_uik = ?"
            " AND resolved_at IS NULL ORDER BY id DESC LIMIT 1",
            (self.user, address, new_uik),
        )
        return _change(r) if r else None

    def mark_noticed(self, change_id: int) -> bool:
        """Record that the INBOX notice of this change was queued; False if it already was
        (one notice per change, however many messages are held)."""
        with self.db.transaction() as c:
            return (
                c.execute(
                    "UPDATE identity_changes SET noticed = 1 WHERE id = ? AND noticed = 0",
                    (change_id,),
                ).rowcount
                > 0
            )

    def pending_identity_changes(self) -> list[IdentityChange]:
        return [
            _change(r)
            for r in self.db.all(
                "SELECT * FROM identity_changes WHERE user = ? AND resolved_at IS NULL ORDER BY id",
                (self.user,),
            )
        ]

    def changes_of(self, address: str) -> list[IdentityChange]:
        """The pending changes of one contact, oldest first."""
        return [c for c in self.pending_identity_changes() if c.address == address]

    def accept_key(self, address: str, typed: str, now: int) -> IdentityChange:
        """Pin the new identity key whose fingerprint ``typed`` is (case, spaces and dashes
        aside), if ``address`` has a pending change to it, or a rejected one to it while
        the rejected-from key is still pinned (the person changed their mind).

        The contact keeps its blocked flag and the token we granted them; *verified* is
        cleared, because what was verified was the old key, and so is the token the old key
        granted us (the new identity grants its own with its next message; until then we
        write as a stranger, with a proof of work).  Every other pending change of the address is
        rejected: the person said which key is their contact's.  Raises UsageError if there
        is nothing to accept and FingerprintMismatch if ``typed`` matches none of the keys.
        """
        check_typed(typed)
        with self.db.transaction() as c:
            contact = c.execute(
                "SELECT uik_pk FROM contacts WHERE user = ? AND address = ?", (self.user, address)
            ).fetchone()
            rows = c.execute(
                "SELECT * FROM identity_changes WHERE user = ? AND address = ?"
                " AND (resolved_at IS NULL OR outcome = 'rejected') ORDER BY id DESC",
                (self.user, address),
            ).fetchall()
            candidates = [
                _change(r)
                for r in rows
                if r["resolved_at"] is None
                or (contact is not None and r["old_uik"] == contact["uik_pk"])
            ]
            if not candidates:
                raise UsageError(f"{address} has no identity key change waiting to be accepted.")
            chosen = next((ch for ch in candidates if fingerprint_matches(typed, ch.new_uik)), None)
            if chosen is None:
                # The new key's fingerprint is not repeated here: copying it from an error
                # message into the command is exactly the comparison that must not be skipped.
                raise FingerprintMismatch(
                    f"The fingerprint you typed does NOT match {address}'s new identity key. "
                    "Nothing was changed: the old key stays pinned and held mail stays in "
                    "Quarantine. Compare again with your contact over a channel you trust; if "
                    "they did not change their key, run "
                    f"`onionpost contacts reject-key {address}`."
                )
            pin = chosen.new_pin or pin_encode(Pin(chosen.new_uik, 0, bytes(32), {}))
            # A new contact row, or the new key over the old one (what was verified and the
            # token the old key granted go with it; first_seen, blocked and our token stay).
            c.execute(
                "INSERT INTO contacts (user, address, uik_pk, pin, device_list, bundle,"
                " bundle_fetched_at, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (user, address) DO UPDATE SET uik_pk = excluded.uik_pk,"
                " pin = excluded.pin, device_list = excluded.device_list,"
                " bundle = excluded.bundle, bundle_fetched_at = excluded.bundle_fetched_at,"
                " verified = 0, token_to_them = NULL, last_seen = excluded.last_seen",
                (
                    self.user,
                    address,
                    chosen.new_uik,
                    pin,
                    chosen.new_device_list,
                    chosen.new_bundle,
                    now if chosen.new_bundle else None,
                    now,
                    now,
                ),
            )
            c.execute(
                "UPDATE identity_changes SET resolved_at = ?, outcome = 'accepted' WHERE id = ?",
                (now, chosen.id),
            )
            self._reject_pending(c, address, now)
            return chosen

    def reject_key(self, address: str, now: int) -> list[IdentityChange]:
        """Keep the pinned key: every pending change of ``address`` is rejected, and later
        mail signed by a rejected key is refused (see :meth:`record_identity_change`).
        Raises UsageError if nothing was pending."""
        with self.db.transaction() as c:
            rows = c.execute(
                "SELECT * FROM identity_changes WHERE user = ? AND address = ?"
                " AND resolved_at IS NULL ORDER BY id",
                (self.user, address),
            ).fetchall()
            if not rows:
                raise UsageError(f"{address} has no identity key change waiting to be rejected.")
            self._reject_pending(c, address, now)
            return [_change(r) for r in rows]

    def _reject_pending(self, c: sqlite3.Connection, address: str, now: int) -> None:
        """Resolve every still-pending change of ``address`` as rejected (inside ``c``)."""
        c.execute(
            "UPDATE identity_changes SET resolved_at = ?, outcome = 'rejected'"
            " WHERE user = ? AND address = ? AND resolved_at IS NULL",
            (now, self.user, address),
        )
