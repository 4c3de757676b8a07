"""Contacts you control: blocking a contact and a contacts-only mailbox, end to end.

Two inboxes on loopback: alice's (A) and dave's (B).  What is checked is what each side
sees: the blocked sender a permanent, vague bounce; the person nothing at all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from onionpost.inbox.postoffice import CONTACTS_ONLY, TOKEN_REFUSED
from onionpost.testing.harness import DeviceNode, Loopback, compose, subjects


class World(Loopback):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.a = self.add_inbox("inbox-a")
        self.b = self.add_inbox("inbox-b")
        self.alice = self.add_person(self.a, "alice")
        self.dave = self.add_person(self.b, "dave")

    async def hand_over(self, sender: DeviceNode, to: DeviceNode, subject: str) -> None:
        """Seal and hand to the sender's inbox; not delivered yet."""
        sender.submissions.submit(sender.user, [to.address], compose(sender, to, subject))
        await sender.submissions.process_due()

    async def send(self, sender: DeviceNode, to: DeviceNode, subject: str) -> None:
        await self.hand_over(sender, to, subject)
        await self.deliver(sender, to)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


async def _acquainted(w: World) -> None:
    await w.send(w.alice, w.dave, "hello dave")
    await w.send(w.dave, w.alice, "hello alice")
    assert subjects(w.alice) == ["hello alice"]
    assert w.dave.contacts.get(str(w.alice.address)).token_to_them is not None  # type: ignore[union-attr]


async def test_block_refuses_at_the_inbox_and_unblock_restores_nothing(world: World) -> None:
    w = world
    await _acquainted(w)
    dave = str(w.dave.address)

    found, token = w.alice.contacts.block(dave)
    assert found and token is not None
    assert await w.alice.device.session.withdraw_token(token) is True

    # dave's next mail carries the withdrawn token: a permanent, vague bounce at the inbox
    await w.send(w.dave, w.alice, "after the block")
    assert w.bounced(w.dave) == [("5.7.1", TOKEN_REFUSED)]
    assert "block" not in TOKEN_REFUSED.lower()
    assert subjects(w.alice) == ["hello alice"]  # nothing reached alice
    assert "Undelivered Mail Returned to Sender" in subjects(w.dave)
    # dave's device forgot the refused token: from now on dave writes as a stranger
    assert w.dave.contacts.get(str(w.alice.address)).token_to_them is None  # type: ignore[union-attr]

    # with a proof of work the inbox takes it (it cannot know who a stranger is), and
    # alice's device drops it once it has verified the sender: no mail, no notice
    await w.send(w.dave, w.alice, "as a stranger")
    assert len(w.bounced(w.dave)) == 1
    assert subjects(w.alice) == ["hello alice"]
    assert (
        w.a.inbox.store.pending(
            w.alice.device.account.mailbox_id, w.alice.device.account.device.device_id
        )
        == []
    )

    # alice writing to a blocked contact grants no token
    await w.send(w.alice, w.dave, "one more from alice")
    assert w.dave.contacts.get(str(w.alice.address)).token_to_them is None  # type: ignore[union-attr]

    # unblocking restores nothing silently: the old token stays withdrawn
    assert w.alice.contacts.unblock(dave)
    assert w.alice.contacts.get(dave).token_from_them is None  # type: ignore[union-attr]
    assert not w.a.inbox.store.token_valid(
        w.alice.device.account.mailbox_id, w.a.inbox.token_hash(token)
    )
    await w.send(w.dave, w.alice, "after unblocking")  # a stranger's stamp, accepted
    assert subjects(w.alice) == ["hello alice", "after unblocking"]

    # ... and with contacts-only on, a stranger is refused
    assert await w.alice.device.session.set_policy(accepts_strangers=False) is False
    await w.send(w.dave, w.alice, "refused as a stranger")
    assert subjects(w.alice) == ["hello alice", "after unblocking"]


async def test_contacts_only_refuses_strangers_and_lets_contacts_in(world: World) -> None:
    w = world
    # alice has never had a token from dave: at dave's inbox she is a stranger
    assert await w.dave.device.session.policy() is True
    # a stranger's message sealed (with a stamp) while dave's mailbox was open ...
    await w.hand_over(w.alice, w.dave, "sealed while open")
    assert await w.dave.device.session.set_policy(accepts_strangers=False) is False
    assert await w.dave.device.session.policy() is False
    # ... is refused at dave's inbox once it is contacts-only, with the specified words
    await w.deliver(w.alice, w.dave)
    assert w.bounced(w.alice) == [("5.7.1", CONTACTS_ONLY)]
    assert "contacts only" in CONTACTS_ONLY and "introduce you" in CONTACTS_ONLY
    assert "sealed while open" not in subjects(w.dave)

    # sealing against the closed mailbox's bundle refuses at once, with the same words
    w.alice.device.directory.forget(w.dave.address)
    w.alice.submissions.submit(
        "alice", [w.dave.address], compose(w.alice, w.dave, "sealed while closed")
    )
    await w.alice.submissions.process_due()
    (pending,) = [p for p in w.alice.submissions.store.listing("alice")]
    assert "contacts only" in (pending.last_error or "")

    # a contact gets through: dave writes to alice, granting her a token
    await w.send(w.dave, w.alice, "welcome")
    assert w.alice.contacts.get(str(w.dave.address)).token_to_them is not None  # type: ignore[union-attr]
    await w.send(w.alice, w.dave, "as a contact")
    assert "as a contact" in subjects(w.dave)


async def test_the_policy_survives_a_restart(world: World) -> None:
    w = world
    await w.alice.device.session.set_policy(accepts_strangers=False)
    await w.a.stop()
    w.a.close()
    w.a = w.reopen_inbox(w.a)
    await w.a.start(worker=False)
    mb = w.a.inbox.store.mailbox(w.alice.device.account.mailbox_id)
    assert mb is not None and mb.accepts_strangers is False
    assert await w.alice.device.session.policy() is False
    # the bundle says so too, so senders need not try
    bundle = w.a.inbox.bundle("alice", w.clock.now())
    from onionpost.core.crypto.bundle import KeyBundle

    assert KeyBundle.parse(bundle).policy.accepts_strangers is False


async def test_a_policy_set_beside_the_running_inbox_is_in_its_next_bundle(world: World) -> None:
    """`contacts policy` on the inbox's machine writes the database with an inbox of its
    own; the running one must not keep serving its cached (open) bundle for a minute."""
    from onionpost.core.crypto.bundle import KeyBundle
    from onionpost.inbox.postoffice import Inbox
    from onionpost.store.inbox import InboxStore

    w = world
    running = w.a.inbox
    now = w.clock.now()
    assert KeyBundle.parse(running.bundle("alice", now)).policy.accepts_strangers is True
    beside = Inbox(
        store=InboxStore(running.store.db),
        outbox=running.outbox,
        secrets=running.secrets,
        config=running.config,
    )
    beside.set_accepts_strangers(w.alice.device.account.mailbox_id, False)
    assert KeyBundle.parse(running.bundle("alice", now)).policy.accepts_strangers is False
