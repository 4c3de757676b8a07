"""Per-user address books, and the upgrade of a device.db whose contacts were shared."""

from __future__ import annotations

from pathlib import Path

import pytest

from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.crypto.sender import pin_parse
from onionpost.core.errors import FingerprintMismatch, UsageError
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
    ben.accept_key(H, fingerprint(b"v" * 32), 4)
    assert ben.get(H) is not None and ben.get(H).uik_pk == b"v" * 32  # type: ignore[union-attr]
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
        assert (change.address, change.old_uik, change.new_uik, change.seen_at) == (
            J,
            b"u" * 32,
            b"w" * 32,
            7,
        )
        assert change.pending and change.new_pin is None and change.held == 0
    assert ContactStore(db, "nobody").all() == []
    db.close()


def test_upgrade_of_a_single_user_keeps_everything(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    _old_device_db(path, gateway=["ann"], mailbox_only=[])
    db = Database(path, DEVICE_COMPONENTS)
    hal = ContactStore(db, "ann").get(H)
    assert hal is not None and hal.token_from_them == b"f" * 32 and hal.verified
    db.close()


def _store(tmp_path: Path) -> tuple[Database, ContactStore]:
    db = Database(tmp_path / "device.db", DEVICE_COMPONENTS)
    store = ContactStore(db, "ann")
    store.remember(H, uik_pk=b"u" * 32, pin=b"p" * 32, now=1)
    store.set_token_to_them(H, b"t" * 32)
    store.set_token_from_them(H, b"f" * 32)
    store.set_flags(H, verified=True)
    return db, store


def test_a_key_change_is_recorded_once_and_counts_held_mail(tmp_path: Path) -> None:
    db, store = _store(tmp_path)
    first = store.record_identity_change(H, b"u" * 32, b"v" * 32, 2, new_pin=b"n1", held=True)
    again = store.record_identity_change(H, b"u" * 32, b"v" * 32, 3, new_pin=b"n2", held=True)
    bundle = store.record_identity_change(H, b"u" * 32, b"v" * 32, 4, bundle=b"b")
    assert first.id == again.id == bundle.id and first.pending
    assert (bundle.held, bundle.new_pin, bundle.new_bundle, bundle.seen_at) == (2, b"n2", b"b", 2)
    assert store.mark_noticed(first.id) and not store.mark_noticed(first.id)
    other = store.record_identity_change(H, b"u" * 32, b"x" * 32, 5)
    assert other.id != first.id
    assert [c.new_uik for c in store.changes_of(H)] == [b"v" * 32, b"x" * 32]
    assert store.pending_change(H, b"x" * 32) == other
    assert store.get(H).uik_pk == b"u" * 32  # type: ignore[union-attr]  # nothing pinned
    db.close()


def test_accept_key_pins_only_the_typed_fingerprint(tmp_path: Path) -> None:
    db, store = _store(tmp_path)
    with pytest.raises(UsageError, match="no identity key change"):
        store.accept_key(H, fingerprint(b"v" * 32), 2)
    store.record_identity_change(H, b"u" * 32, b"v" * 32, 2, new_pin=b"np", device_list=b"dl")
    store.record_identity_change(H, b"u" * 32, b"x" * 32, 3)
    for wrong in (fingerprint(b"u" * 32), fingerprint(b"v" * 32)[:-1] + "a"):
        with pytest.raises(FingerprintMismatch, match="does NOT match"):
            store.accept_key(H, wrong, 4)
    with pytest.raises(UsageError, match="is not a fingerprint"):
        store.accept_key(H, "not-a-fingerprint!", 4)
    assert store.get(H).uik_pk == b"u" * 32  # type: ignore[union-attr]
    assert len(store.changes_of(H)) == 2

    typed = "  " + fingerprint(b"v" * 32).upper().replace("-", " ") + " "
    accepted = store.accept_key(H, typed, 5)
    assert accepted.new_uik == b"v" * 32
    c = store.get(H)
    assert c is not None
    assert (c.uik_pk, c.pin, c.device_list) == (b"v" * 32, b"np", b"dl")
    assert not c.verified  # what was verified was the old key
    assert c.token_to_them is None and c.token_from_them == b"f" * 32
    assert store.changes_of(H) == []  # the other candidate was rejected with it
    # the other key was rejected as a change from the old pin; presented again it is a
    # change from the new pin, and asks again
    assert store.record_identity_change(H, b"v" * 32, b"x" * 32, 6).pending
    db.close()


def test_reject_key_keeps_the_pin_and_refuses_the_rejected_key(tmp_path: Path) -> None:
    db, store = _store(tmp_path)
    with pytest.raises(UsageError, match="no identity key change"):
        store.reject_key(H, 2)
    store.record_identity_change(H, b"u" * 32, b"v" * 32, 2, held=True)
    (rejected,) = store.reject_key(H, 3)
    assert rejected.new_uik == b"v" * 32 and rejected.held == 1
    assert store.changes_of(H) == []
    c = store.get(H)
    assert c is not None and c.uik_pk == b"u" * 32 and c.verified
    later = store.record_identity_change(H, b"u" * 32, b"v" * 32, 4, held=True)
    assert later.outcome == "rejected" and later.held == 1  # refused, not held again
    assert store.pending_identity_changes() == []
    # a change recorded before contacts migration 0006 has no pin of the new key: accepting it pins
    # the identity key alone (the next verified bundle or message fills in the devices)
    accepted = store.accept_key(H, fingerprint(b"v" * 32), 5)
    assert accepted.new_pin is None
    pin = pin_parse(store.get(H).pin)  # type: ignore[union-attr]
    assert (pin.uik_pk, pin.device_list_version, pin.heads) == (b"v" * 32, 0, {})
    db.close()
