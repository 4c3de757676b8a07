"""Key changes done right, end to end: two inboxes on loopback, and dave's identity changes.

dave (inbox B) and alice (inbox A) know each other; then dave's mailbox is made again with a
new identity key under the same address (what a reinstall without a backup does, and what
someone who took over dave's inbox would do).  What is checked is what alice sees: his mail
held in Quarantine with the key-change header and one notice in INBOX, a wrong fingerprint
refused, the right one pinned; or the change rejected and the old pin kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest

from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.errors import FingerprintMismatch, UsageError
from onionpost.core.trust import KEY_CHANGE_HEADER, QUARANTINE
from onionpost.testing.harness import DeviceNode, Loopback, compose


def parsed(d: DeviceNode, folder: str) -> list[EmailMessage]:
    return [message_from_bytes(m, policy=default) for m in d.filed(folder)]  # type: ignore[misc]


def subjects(d: DeviceNode, folder: str = "INBOX") -> list[str]:
    return [str(m["Subject"]) for m in parsed(d, folder)]


class World(Loopback):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.a = self.add_inbox("inbox-a")
        self.b = self.add_inbox("inbox-b")
        self.alice = self.add_person(self.a, "alice")
        self.dave = self.add_person(self.b, "dave")

    async def send(self, sender: DeviceNode, to: DeviceNode, subject: str) -> None:
        sender.submissions.submit(
            sender.user, [to.address], compose(sender, to, subject, unique=True)
        )
        await self.deliver(sender, to)

    async def new_dave(self, *, later: bool = True) -> DeviceNode:
        """dave's mailbox made again under the same address, with a new identity key."""
        old = self.dave
        self.b.inbox.store.remove_mailbox(old.device.account.mailbox_id)
        await old.close()
        self.dave = self.add_person(self.b, "dave", dirname="dave-new")
        if later:
            self.clock.advance(120)  # past the minute a fetched bundle is reused for
        assert str(self.dave.address) == str(old.address)
        assert self.dave.device.account.uik_pk != old.device.account.uik_pk
        return self.dave


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


async def _changed(
    w: World, *, verified: bool = False, later: bool = True
) -> tuple[str, bytes, bytes]:
    await w.send(w.alice, w.dave, "hello dave")
    await w.send(w.dave, w.alice, "hello alice")
    assert subjects(w.alice) == ["hello alice"]
    dave = str(w.dave.address)
    if verified:
        assert w.alice.contacts.set_flags(dave, verified=True)
    old_uik = w.dave.device.account.uik_pk
    new = await w.new_dave(later=later)
    await w.send(new, w.alice, "from the new key")
    return dave, old_uik, new.device.account.uik_pk


async def test_mail_from_a_new_key_is_held_and_accepted_only_with_its_fingerprint(
    world: World,
) -> None:
    w = world
    # at once: alice's node still holds dave's old bundle, fetched a moment ago; accepting
    # the new key must not leave mail sealed to the old one
    dave, old_uik, new_uik = await _changed(w, later=False)

    # held in Quarantine with the header; one notice in INBOX; nothing else in INBOX
    (held,) = parsed(w.alice, QUARANTINE)
    assert held["Subject"] == "from the new key"
    warning = str(held[KEY_CHANGE_HEADER])
    assert warning.startswith("HELD") and fingerprint(new_uik) in warning
    assert fingerprint(old_uik) in warning
    assert held["X-Onionpost-Verified"] is None  # not claimed verified before acceptance
    assert "body of from the new key" in held.get_content()
    inbox = parsed(w.alice, "INBOX")
    assert str(inbox[0]["Subject"]) == "hello alice"
    (notice,) = inbox[1:]
    assert notice["X-Onionpost-Notice"] == "key-change"
    assert dave in str(notice["Subject"]) and "VERIFIED" not in str(notice["Subject"])
    text = notice.get_content()
    assert f"onionpost contacts accept-key {dave} FINGERPRINT" in text
    assert fingerprint(new_uik) in text and fingerprint(old_uik) in text

    # a second message from the new key: held too, no second notice
    await w.send(w.dave, w.alice, "again from the new key")
    assert subjects(w.alice, QUARANTINE) == ["from the new key", "again from the new key"]
    assert len(subjects(w.alice)) == 2
    (change,) = w.alice.contacts.pending_identity_changes()
    assert (change.address, change.old_uik, change.new_uik, change.held) == (
        dave,
        old_uik,
        new_uik,
        2,
    )
    assert w.alice.contacts.get(dave).uik_pk == old_uik  # type: ignore[union-attr]

    # the wrong fingerprint (the old key's, a typo) is refused and changes nothing
    right = fingerprint(new_uik)
    typo = right[:-1] + ("y" if right.endswith("x") else "x")  # one character off, never equal
    for wrong in (fingerprint(old_uik), typo, "abcd"):
        with pytest.raises(UsageError) as info:
            w.alice.contacts.accept_key(dave, wrong, w.clock.now())
        assert "fingerprint" in str(info.value).lower()
    assert w.alice.contacts.get(dave).uik_pk == old_uik  # type: ignore[union-attr]
    assert len(w.alice.contacts.pending_identity_changes()) == 1

    # the right one, as read aloud (spaces, upper case): pinned
    typed = fingerprint(new_uik).replace("-", " ").upper()
    accepted = w.alice.contacts.accept_key(dave, typed, w.clock.now())
    assert accepted.new_uik == new_uik and accepted.held == 2
    contact = w.alice.contacts.get(dave)
    assert contact is not None and contact.uik_pk == new_uik and not contact.verified
    assert w.alice.contacts.pending_identity_changes() == []

    # from now on his mail is delivered to INBOX and alice's mail reaches him
    await w.send(w.dave, w.alice, "after acceptance")
    assert subjects(w.alice)[-1] == "after acceptance"
    assert len(subjects(w.alice, QUARANTINE)) == 2  # held mail stays where it was
    assert parsed(w.alice, "INBOX")[-1]["X-Onionpost-Verified"] is not None
    await w.send(w.alice, w.dave, "welcome back")
    assert subjects(w.dave) == ["welcome back"]


async def test_rejecting_keeps_the_old_pin_and_refuses_the_new_key(world: World) -> None:
    w = world
    dave, old_uik, new_uik = await _changed(w)
    assert subjects(w.alice, QUARANTINE) == ["from the new key"]

    (rejected,) = w.alice.contacts.reject_key(dave, w.clock.now())
    assert rejected.new_uik == new_uik
    assert w.alice.contacts.pending_identity_changes() == []
    assert w.alice.contacts.get(dave).uik_pk == old_uik  # type: ignore[union-attr]

    # further mail signed by the rejected key: refused, not held, no new notice, and taken
    # from the inbox (it does not come back)
    await w.send(w.dave, w.alice, "after the rejection")
    assert subjects(w.alice, QUARANTINE) == ["from the new key"]
    assert len(subjects(w.alice)) == 2  # "hello alice" and the one notice
    assert w.alice.contacts.pending_identity_changes() == []
    account = w.alice.device.account
    assert w.a.inbox.store.pending(account.mailbox_id, account.device.device_id) == []
    assert w.alice.contacts.get(dave).uik_pk == old_uik  # type: ignore[union-attr]

    # changing one's mind is possible, with the fingerprint
    with pytest.raises(FingerprintMismatch):
        w.alice.contacts.accept_key(dave, fingerprint(old_uik), w.clock.now())
    w.alice.contacts.accept_key(dave, fingerprint(new_uik), w.clock.now())
    assert w.alice.contacts.get(dave).uik_pk == new_uik  # type: ignore[union-attr]


async def test_a_blocked_contact_under_a_new_key_is_dropped_not_held(world: World) -> None:
    """Blocking holds across a key change: mail signed by a new key under a blocked
    contact's address is dropped like the rest of theirs (no Quarantine, no notice)."""
    w = world
    await w.send(w.alice, w.dave, "hello dave")
    await w.send(w.dave, w.alice, "hello alice")
    dave = str(w.dave.address)
    found, _ = w.alice.contacts.block(dave)
    assert found
    new = await w.new_dave()
    await w.send(new, w.alice, "from the new key")
    assert subjects(w.alice, QUARANTINE) == []
    assert subjects(w.alice) == ["hello alice"]
    assert w.alice.contacts.pending_identity_changes() == []
    account = w.alice.device.account
    assert w.a.inbox.store.pending(account.mailbox_id, account.device.device_id) == []


async def test_a_verified_contacts_key_change_is_louder(world: World) -> None:
    w = world
    dave, old_uik, _ = await _changed(w, verified=True)
    assert subjects(w.alice, QUARANTINE) == ["from the new key"]
    (held,) = parsed(w.alice, QUARANTINE)
    assert "VERIFIED" in str(held[KEY_CHANGE_HEADER])
    notice = parsed(w.alice, "INBOX")[-1]
    assert str(notice["Subject"]).startswith(f"WARNING: your VERIFIED contact {dave}")
    assert "impersonation" in notice.get_content()
    contact = w.alice.contacts.get(dave)
    assert contact is not None and contact.verified and contact.uik_pk == old_uik


async def test_sending_to_a_changed_key_records_it_and_does_not_encrypt_to_it(
    world: World,
) -> None:
    """alice writes first after dave's change: the bundle's new key is recorded (with its
    verified pin, so accepting it needs no message from him) and nothing is sealed to it."""
    w = world
    await w.send(w.alice, w.dave, "hello dave")
    await w.send(w.dave, w.alice, "hello alice")
    dave = str(w.dave.address)
    new = await w.new_dave()
    await w.send(w.alice, new, "to whoever holds the new key")
    assert subjects(new) == []
    # bounced at once, saying what to do (not queued for a key nobody accepted)
    await w.alice.file_due()
    (bounce,) = [m for m in parsed(w.alice, "INBOX") if "Undelivered" in str(m["Subject"])]
    assert f"onionpost contacts accept-key {dave}" in bounce.as_string()
    (change,) = w.alice.contacts.pending_identity_changes()
    assert change.new_uik == new.device.account.uik_pk and change.new_pin is not None
    assert change.held == 0
    w.alice.contacts.accept_key(dave, fingerprint(change.new_uik), w.clock.now())
    await w.send(w.alice, new, "after acceptance")
    assert subjects(new)[-1] == "after acceptance"
