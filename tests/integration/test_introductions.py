"""Introductions end to end (protocol §16): alice introduces bob to carol.

Four inboxes on loopback, one person each: alice (A, the introducer, a contact of both),
bob (B, whose mailbox is contacts-only), carol (C) and dave (a stranger to bob).  What is
checked is what each person sees: bob a notice mail and nothing from non-contacts, carol a
refusal before the introduction and delivery without a proof of work after bob accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest

from onionpost.core.crypto import envelope
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.crypto.introduction import introduction_pair
from onionpost.core.errors import IntroductionMismatch, UsageError
from onionpost.device.introductions import accept, block, introduce
from onionpost.store.introductions import IntroductionStore
from onionpost.store.submissions import SubmissionStore
from onionpost.testing.harness import DeviceNode, InboxNode, Loopback, compose, subjects


def filed(d: DeviceNode, subject_part: str) -> list[EmailMessage]:
    out = []
    for raw in d.filed("INBOX"):
        m = message_from_bytes(raw, policy=default)
        if subject_part in str(m["Subject"]):
            out.append(m)
    return out  # type: ignore[return-value]


class World(Loopback):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.inboxes: dict[str, InboxNode] = {}
        self.people: dict[str, DeviceNode] = {}
        for name in ("alice", "bob", "carol", "dave"):
            node = self.inboxes[name] = self.add_inbox(f"inbox-{name}")
            self.people[name] = self.add_person(node, name)
        self.alice, self.bob = self.people["alice"], self.people["bob"]
        self.carol, self.dave = self.people["carol"], self.people["dave"]

    async def send(self, sender: DeviceNode, to: DeviceNode, subject: str) -> None:
        sender.submissions.submit(sender.user, [to.address], compose(sender, to, subject))
        await self.deliver(sender, to)

    def counted_at(self, who: DeviceNode, scope: str) -> int:
        """How many envelopes the person's inbox accepted so far as a stranger's (with a
        stamp: ``strangers``) or with a contact token (``token``)."""
        db = self.inboxes[who.user].db
        sql = "SELECT coalesce(sum(count), 0) FROM rate_counters WHERE scope = ?"
        return int(db.scalar(sql, (scope,)) or 0)

    def introduce(self, by: DeviceNode, b: DeviceNode, c: DeviceNode) -> None:
        introduce(
            by.db,
            contacts=by.contacts,
            me=by.address,
            uik_pk=by.device.account.uik_pk,
            dsk_seed=by.device.account.device.dsk_seed,
            b=str(b.address),
            c=str(c.address),
            now=self.clock.now(),
        )

    async def accept(self, who: DeviceNode, introduced: DeviceNode, *, check: bool = True):  # type: ignore[no-untyped-def]
        now = self.clock.now()

        async def fetch(addr):  # type: ignore[no-untyped-def]
            return await who.device.directory.identity_now(addr, now=now)

        return await accept(
            contacts=who.contacts,
            introductions=IntroductionStore(who.db, who.user),
            address=str(introduced.address),
            register=who.device.session.register_token,
            fetch_uik=fetch if check else None,
            now=now,
        )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


async def acquaint(w: World, x: DeviceNode, y: DeviceNode) -> None:
    """x and y wrote to each other: each holds a token for the other's mailbox."""
    await w.send(x, y, f"hello {y.user} from {x.user}")
    await w.send(y, x, f"hello {x.user} from {y.user}")


async def test_introduction_lets_carol_through_bobs_contacts_only_mailbox(world: World) -> None:
    w = world
    await acquaint(w, w.alice, w.bob)
    await acquaint(w, w.alice, w.carol)
    assert await w.bob.device.session.set_policy(accepts_strangers=False) is False

    # before: carol is a stranger to bob, refused before anything is sent
    w.carol.submissions.submit("carol", [w.bob.address], compose(w.carol, w.bob, "too early"))
    await w.deliver(w.carol, w.bob)
    (pending,) = w.carol.submissions.store.listing("carol")
    assert "contacts only" in (pending.last_error or "")
    assert "too early" not in subjects(w.bob)
    w.carol.submissions.store.cancel(pending.submission_id)

    # alice introduces bob and carol: each gets a notice mail naming the other
    w.introduce(w.alice, w.bob, w.carol)
    await w.deliver(w.alice, w.bob, w.carol)
    carol_fp = fingerprint(w.carol.device.account.uik_pk)
    (note,) = filed(w.bob, "introduces you to")
    assert str(note["Subject"]) == f"alice introduces you to {w.carol.address}"
    text = note.get_content()
    assert carol_fp in text
    assert f"onionpost contacts accept-intro {w.carol.address}" in text
    assert note["X-Onionpost-Notice"] == "introduction"
    (note_c,) = filed(w.carol, "introduces you to")
    assert fingerprint(w.bob.device.account.uik_pk) in note_c.get_content()
    # nothing was pinned and nobody let in by the introduction alone
    assert w.bob.contacts.get(str(w.carol.address)) is None

    # carol presents the introduction's token at once: bob has not accepted, so it is refused
    await w.send(w.carol, w.bob, "before bob accepted")
    assert "before bob accepted" not in subjects(w.bob)
    assert w.bounced(w.carol)[-1][0] == "5.7.1"

    # bob accepts: carol's identity key is compared with her inbox's and pinned
    accepted = await w.accept(w.bob, w.carol)
    assert accepted.checked_now and accepted.new_contact
    pinned = w.bob.contacts.get(str(w.carol.address))
    assert pinned is not None and pinned.uik_pk == w.carol.device.account.uik_pk
    with pytest.raises(UsageError, match="No introduction"):
        await w.accept(w.bob, w.carol)  # accepted once

    # carol's mail now gets through without a proof of work
    stamps, tokens_used = w.counted_at(w.bob, "strangers"), w.counted_at(w.bob, "token")
    await w.send(w.carol, w.bob, "hello bob, alice sent me")
    assert "hello bob, alice sent me" in subjects(w.bob)
    assert w.counted_at(w.bob, "strangers") == stamps
    assert w.counted_at(w.bob, "token") == tokens_used + 1
    (mail,) = filed(w.bob, "alice sent me")
    assert str(w.carol.address) in str(mail["X-Onionpost-Verified"])

    # bob answers: that grants carol a token of bob's own, like any contact
    await w.send(w.bob, w.carol, "welcome carol")
    assert "welcome carol" in subjects(w.carol)

    # blocking carol withdraws the introduction's token too: her next mail bounces
    found, tokens = block(w.bob.contacts, str(w.carol.address))
    # one token: when bob wrote to her he granted the introduction's again, not a new one
    assert found and len(tokens) == 1
    for t in tokens:
        assert await w.bob.device.session.withdraw_token(t) is True
    await w.send(w.carol, w.bob, "after the block")
    assert "after the block" not in subjects(w.bob)


async def test_introduction_from_a_non_contact_is_ignored(world: World) -> None:
    w = world
    await acquaint(w, w.dave, w.carol)
    # dave wrote to bob (a stranger's stamp; bob's mailbox is open) but bob never wrote back:
    # dave is not bob's contact, only someone bob has heard from
    await w.send(w.dave, w.bob, "hello bob from dave")
    assert "hello bob from dave" in subjects(w.bob)
    before = subjects(w.bob)

    w.introduce(w.dave, w.bob, w.carol)
    await w.deliver(w.dave, w.bob, w.carol)
    assert subjects(w.bob) == before  # nothing filed, not even a notice
    assert IntroductionStore(w.bob.db, "bob").all() == []
    assert w.bob.contacts.get(str(w.carol.address)) is None
    # taken from the inbox all the same (not fetched again and again)
    bob = w.bob.device.account
    assert w.inboxes["bob"].inbox.store.pending(bob.mailbox_id, bob.device.device_id) == []
    # carol, who is dave's contact, does get hers
    assert filed(w.carol, "dave introduces you to")


async def test_a_fingerprint_mismatch_is_refused(world: World) -> None:
    w = world
    await acquaint(w, w.alice, w.bob)
    await acquaint(w, w.alice, w.dave)
    # alice's node vouches for carol's address with dave's identity key (mistaken, or
    # someone sits on carol's address): a record as a faulty introducer would send
    now = w.clock.now()
    alice = w.alice.device.account
    carol_addr = w.carol.address
    for_bob, _ = introduction_pair(
        introducer_uik=alice.uik_pk,
        b=("bob", w.bob.address.onion_public_key, w.bob.device.account.uik_pk),
        c=(carol_addr.local, carol_addr.onion_public_key, w.dave.device.account.uik_pk),
        token_b=bytes([1]) * 32,
        token_c=bytes([2]) * 32,
        created_at=now,
        expires_at=now + 86_400,
        dsk_seed=alice.device.dsk_seed,
    )
    SubmissionStore(w.alice.db).add(
        user="alice",
        message=for_bob.encode(),
        headers=b"Subject: introduction\r\n",
        recipients=[str(w.bob.address)],
        message_ref="",
        now=now,
        expires_at=now + 86_400,
        content_type=envelope.CONTENT_INTRODUCTION,
    )
    await w.deliver(w.alice, w.bob)
    (note,) = filed(w.bob, "introduces you to")
    assert fingerprint(w.dave.device.account.uik_pk) in note.get_content()

    # carol's inbox serves her own key, not the introduced one: refused loudly, nothing kept
    with pytest.raises(IntroductionMismatch, match="REFUSED") as err:
        await w.accept(w.bob, w.carol)
    assert fingerprint(w.carol.device.account.uik_pk) in str(err.value)
    assert w.bob.contacts.get(str(carol_addr)) is None
    bob = w.bob.device.account
    assert not w.inboxes["bob"].inbox.store.token_valid(
        bob.mailbox_id, w.inboxes["bob"].inbox.token_hash(bytes([1]) * 32)
    )

    # accepted while carol's inbox cannot be reached: the introduced key is pinned, and the
    # first fetch of carol's keys refuses hers as a changed identity
    await w.accept(w.bob, w.carol, check=False)
    pinned = w.bob.contacts.get(str(carol_addr))
    assert pinned is not None and pinned.uik_pk == w.dave.device.account.uik_pk
    await w.send(w.bob, w.carol, "to the real carol")
    assert "to the real carol" not in subjects(w.carol)
    changes = w.bob.contacts.pending_identity_changes()
    assert [c.address for c in changes] == [str(carol_addr)]
