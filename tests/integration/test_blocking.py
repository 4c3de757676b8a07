"""Contacts you control: blocking a contact and a contacts-only mailbox, end to end.

Two inboxes on loopback: alice's (A) and dave's (B).  What is checked is what each side
sees: the blocked sender a permanent, vague bounce; the person nothing at all.
"""

from __future__ import annotations

import time
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest

from onionpost.api.transport import DirectDialer
from onionpost.clock import FakeClock
from onionpost.inbox import CONTACTS_ONLY, TOKEN_REFUSED

from .harness import DeviceNode, InboxNode


def compose(sender: DeviceNode, to: DeviceNode, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = str(sender.address)
    msg["To"] = str(to.address)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    msg.set_content(f"body of {subject}")
    return msg.as_bytes()


def subjects(d: DeviceNode, folder: str = "INBOX") -> list[str]:
    return [str(message_from_bytes(m, policy=default)["Subject"]) for m in d.filed(folder)]


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.clock = FakeClock(int(time.time()))
        self.dialer = DirectDialer()
        self.a = InboxNode(root, "inbox-a", self.clock, self.dialer)
        self.b = InboxNode(root, "inbox-b", self.clock, self.dialer)
        self.alice = DeviceNode(root, "alice", self.a.provision("alice"), self.clock, self.dialer)
        self.dave = DeviceNode(root, "dave", self.b.provision("dave"), self.clock, self.dialer)

    def inbox_of(self, d: DeviceNode) -> InboxNode:
        return self.a if d is self.alice else self.b

    async def hand_over(self, sender: DeviceNode, to: DeviceNode, subject: str) -> None:
        """Seal and hand to the sender's inbox; not delivered yet."""
        sender.submissions.submit(sender.user, [to.address], compose(sender, to, subject))
        await sender.submissions.process_due()

    async def deliver(self, sender: DeviceNode, to: DeviceNode) -> None:
        await self.inbox_of(sender).worker.run_due()
        await to.device.sync()
        await sender.submissions.check_outbox(sender.device)

    async def send(self, sender: DeviceNode, to: DeviceNode, subject: str) -> None:
        await self.hand_over(sender, to, subject)
        await self.deliver(sender, to)

    def bounced(self, sender: DeviceNode) -> list[tuple[str | None, str | None]]:
        rows = self.inbox_of(sender).inbox.outbox.rows(states=("bounced",))
        return [(r.last_error_code, r.last_error) for r in rows]


@pytest.fixture
async def world(tmp_path: Path):
    w = World(tmp_path)
    await w.a.start(worker=False)
    await w.b.start(worker=False)
    try:
        yield w
    finally:
        await w.alice.close()
        await w.dave.close()
        await w.a.stop()
        await w.b.stop()
        w.a.close()
        w.b.close()


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
    w.a = InboxNode(w.root, "inbox-a", w.clock, w.dialer)
    await w.a.start(worker=False)
    mb = w.a.inbox.store.mailbox(w.alice.device.account.mailbox_id)
    assert mb is not None and mb.accepts_strangers is False
    assert await w.alice.device.session.policy() is False
    # the bundle says so too, so senders need not try
    bundle = w.a.inbox.bundle("alice", w.clock.now())
    from onionpost.crypto.bundle import KeyBundle

    assert KeyBundle.parse(bundle).policy.accepts_strangers is False


async def test_a_policy_set_beside_the_running_inbox_is_in_its_next_bundle(world: World) -> None:
    """`contacts policy` on the inbox's machine writes the database with an inbox of its
    own; the running one must not keep serving its cached (open) bundle for a minute."""
    from onionpost.crypto.bundle import KeyBundle
    from onionpost.inbox import Inbox
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
