"""Per-user address books, and the upgrade of a device.db whose contacts were shared."""

from __future__ import annotations

from pathlib import Path

from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.accounts import AccountStore, ScryptCost
from onionpost.store.contacts import ContactStore
from onionpost.store.db import Database, available_migrations

H = "hal@" + "h" * 56 + ".onion"
J = "jo@" + "j" * 56 + ".onion"
CHEAP = ScryptCost(n=2, r=1, p=1)


def test_two_users_keep_separate_contacts(tmp_path: Path) -> None:
    db = Database(tmp_path / "device.db", DEVICE_COMPONENTS)
    ann, ben = ContactStore(db, "ann"), ContactStore(db, "ben")
    ann.remember(H, uik_pk=b"u" * 32, pin=b"p" * 32, now=1)
    assert ben.get(H) is None and ben.all() == []
    ben.remember(H, uik_pk=b"u" * 32, pin=b"p" * 32, now=2)
    ann.set_token_from_them(H, b"a" * 32)
    ben.set_token_from_them(H, b"b" * 32)
    ann.set_flags(H, verified=True)
    ben.record_identity_change(H, b"u" * 32, b"v" * 32, 3)
    a, b = ann.get(H), ben.get(H)
    assert a is not None and b is not None
    assert (a.token_from_them, a.verified) == (b"a" * 32, True)
    assert (b.token_from_them, b.verified) == (b"b" * 32, False)
    assert ann.pending_identity_changes() == []
    assert len(ben.pending_identity_changes()) == 1
    assert ben.accept_identity(H, 4) and ben.get(H) is None
    assert ann.get(H) is not None  # ben accepting a new key does not touch ann's pin
    assert ann.forget_all() == 1 and ann.all() == []
    db.close()


def _old_device_db(path: Path, *, gateway: list[str], mailbox_only: list[str]) -> None:
    """A device.db as onionpost wrote it before contacts were per user (contacts version 1)."""
    db = Database(path, ("mailbox", "accounts"))
    version, name, sql = available_migrations("contacts")[0]
    assert version == 1
    with db.transaction() as c:
        for statement in sql.split(";"):
            if statement.strip():
                c.execute(statement)
        c.execute(
            "INSERT INTO schema_migrations VALUES ('contacts', 1, ?, 0)",
            (name,),
        )
        for address, token_to, token_from, verified, blocked in (
            (H, b"t" * 32, b"f" * 32, 1, 0),
            (J, None, None, 0, 1),
        ):
            c.execute(
                "INSERT INTO contacts (address, uik_pk, pin, device_list, bundle,"
                " bundle_fetched_at, token_to_them, token_from_them, display_name, first_seen,"
                " last_seen, verified, blocked)"
                " VALUES (?, ?, ?, NULL, x'0102', 5, ?, ?, 'Hal', 1, 2, ?, ?)",
                (address, b"u" * 32, b"p" * 32, token_to, token_from, verified, blocked),
            )
        c.execute(
            "INSERT INTO identity_changes (address, old_uik, new_uik, seen_at) VALUES (?, ?, ?, 7)",
            (J, b"u" * 32, b"w" * 32),
        )
    accounts = AccountStore(db, cost=CHEAP)
    for user in gateway:
        accounts.add(user, f"{user}@" + "a" * 56 + ".onion", "password")
    with db.transaction() as c:  # mail received: the message ids taken from the inbox
        for user in [*gateway, *mailbox_only]:
            c.execute(
                "INSERT INTO mailbox_seen_ids (user, msg_id, expires_at) VALUES (?, ?, 9)",
                (user, user.encode()),
            )
    db.close()


def test_upgrade_copies_shared_contacts_to_every_user(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    _old_device_db(path, gateway=["ann", "ben"], mailbox_only=["cat"])
    db = Database(path, DEVICE_COMPONENTS)
    assert db.schema_version("contacts") == len(available_migrations("contacts"))
    for user in ("ann", "ben", "cat"):
        store = ContactStore(db, user)
        assert [c.address for c in store.all()] == [H, J], user
        hal = store.get(H)
        assert hal is not None
        assert (hal.uik_pk, hal.pin, hal.bundle, hal.display_name) == (
            b"u" * 32,
            b"p" * 32,
            b"\x01\x02",
            "Hal",
        )
        assert hal.token_to_them == b"t" * 32  # valid at hal's inbox, whoever presents it
        # registered at one user's mailbox, nobody knows whose: each registers a fresh one
        assert hal.token_from_them is None
        assert hal.verified
        jo = store.get(J)
        assert jo is not None and jo.blocked
        (change,) = store.pending_identity_changes()
        assert change == (J, b"u" * 32, b"w" * 32, 7)
    assert ContactStore(db, "nobody").all() == []
    db.close()


def test_upgrade_of_a_single_user_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    _old_device_db(path, gateway=["ann"], mailbox_only=[])
    db = Database(path, DEVICE_COMPONENTS)
    hal = ContactStore(db, "ann").get(H)
    assert hal is not None and hal.token_from_them == b"f" * 32 and hal.verified
    db.close()
