"""Introductions one person received (``A introduces you to C``), waiting for a decision.

Rows are written only after the introduction's every signature checked and its sender was
found to be an existing, unblocked contact (:mod:`onionpost.device.sync`).  Like contacts, rows are
per person: a :class:`IntroductionStore` is one user's view.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from onionpost.store.db import Database


@dataclass(frozen=True)
class StoredIntroduction:
    id: int
    introducer: str
    address: str
    uik_pk: bytes
    admit_token: bytes
    present_token: bytes
    received_at: int
    expires_at: int
    accepted_at: int | None


def _row(r: sqlite3.Row) -> StoredIntroduction:
    return StoredIntroduction(
        r["id"],
        r["introducer"],
        r["address"],
        r["uik_pk"],
        r["admit_token"],
        r["present_token"],
        r["received_at"],
        r["expires_at"],
        r["accepted_at"],
    )


class IntroductionStore:
    def __init__(self, db: Database, user: str) -> None:
        self.db = db
        self.user = user

    def add(
        self,
        *,
        introducer: str,
        address: str,
        uik_pk: bytes,
        admit_token: bytes,
        present_token: bytes,
        now: int,
        expires_at: int,
    ) -> None:
        """Record (or renew) an introduction.  An accepted one is left as it is: its token
        is registered at the inbox, and a second introduction must not swap it silently."""
        with self.db.transaction() as c:
            c.execute(
                "INSERT INTO introductions (user, introducer, address, uik_pk, admit_token,"
                " present_token, received_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (user, introducer, address) DO UPDATE SET uik_pk = excluded.uik_pk,"
                " admit_token = excluded.admit_token, present_token = excluded.present_token,"
                " received_at = excluded.received_at, expires_at = excluded.expires_at"
                " WHERE accepted_at IS NULL",
                (
                    self.user,
                    introducer,
                    address,
                    uik_pk,
                    admit_token,
                    present_token,
                    now,
                    expires_at,
                ),
            )

    def pending(self, address: str, now: int) -> list[StoredIntroduction]:
        """Unexpired, not yet accepted introductions of ``address``, newest first."""
        return [
            _row(r)
            for r in self.db.all(
                "SELECT * FROM introductions WHERE user = ? AND address = ?"
                " AND accepted_at IS NULL AND expires_at >= ? ORDER BY received_at DESC, id DESC",
                (self.user, address, now),
            )
        ]

    def all(self) -> list[StoredIntroduction]:
        return [
            _row(r)
            for r in self.db.all(
                "SELECT * FROM introductions WHERE user = ? ORDER BY received_at, id", (self.user,)
            )
        ]

    def mark_accepted(self, intro_id: int, now: int) -> None:
        with self.db.transaction() as c:
            c.execute(
                "UPDATE introductions SET accepted_at = ? WHERE user = ? AND id = ?",
                (now, self.user, intro_id),
            )

    def present_token(self, address: str, uik_pk: bytes, now: int) -> bytes | None:
        """The token an introduction gave us to present at ``address``'s inbox, from the
        newest introduction that names the identity key ``uik_pk`` (the one their bundle
        shows now), accepted or still unexpired."""
        r = self.db.one(
            "SELECT present_token FROM introductions WHERE user = ? AND address = ?"
            " AND uik_pk = ? AND (accepted_at IS NOT NULL OR expires_at >= ?)"
            " ORDER BY received_at DESC, id DESC LIMIT 1",
            (self.user, address, uik_pk, now),
        )
        return None if r is None else bytes(r["present_token"])

    def admitted_tokens(self, address: str) -> list[bytes]:
        """The tokens registered at our inbox for ``address`` by accepted introductions
        (withdrawn with the contact's own token when they are blocked)."""
        return [
            bytes(r["admit_token"])
            for r in self.db.all(
                "SELECT admit_token FROM introductions WHERE user = ? AND address = ?"
                " AND accepted_at IS NOT NULL",
                (self.user, address),
            )
        ]

    def forget(self, address: str) -> None:
        with self.db.transaction() as c:
            c.execute(
                "DELETE FROM introductions WHERE user = ? AND address = ?", (self.user, address)
            )

    def forget_all(self) -> None:
        with self.db.transaction() as c:
            c.execute("DELETE FROM introductions WHERE user = ?", (self.user,))
