"""Abuse resistance at the inbox, end to end on loopback.

A flood of junk (envelopes with no proof of work, and envelopes with a valid stamp) runs
against bob's inbox while alice, a contact holding bob's token, writes to him.  Her mail must
be accepted and filed in bob's INBOX; the junk without a proof must cost nothing, and the
stamped junk only the strangers' own budget.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

from onionpost.base.clock import FakeClock
from onionpost.core.account import Account
from onionpost.core.crypto import envelope, pow
from onionpost.core.crypto.bundle import KeyBundle, verify_bundle
from onionpost.core.crypto.envelope import StanzaTarget
from onionpost.core.errors import PermanentDeliveryError, TemporaryDeliveryError
from onionpost.net.client import InboxClient
from onionpost.net.transport import DirectDialer
from onionpost.testing.harness import DeviceNode, InboxNode

STRANGER_LIMIT = 5


def compose(sender: DeviceNode, to: DeviceNode, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = str(sender.address)
    msg["To"] = str(to.address)
    msg["Subject"] = subject
    msg.set_content(f"body of {subject}")
    return msg.as_bytes()


def subjects(d: DeviceNode, folder: str) -> list[str]:
    return [str(message_from_bytes(m, policy=default)["Subject"]) for m in d.filed(folder)]


async def junk(
    client: InboxClient, inbox: InboxNode, to: Account, sender: Account, i: int, *, stamped: bool
) -> bytes:
    """An envelope from a stranger; ``stamped`` adds a valid proof of work for it."""
    now = inbox.clock.now()
    vb = verify_bundle(
        KeyBundle.parse(await client.bundle(to.local)),
        onion_pk=inbox.secrets.onion_pk,
        local=to.local,
        now=now,
    )
    l2 = io.BytesIO()
    inner = envelope.seal_inner(
        sender=sender.sender_keys(),
        targets=[StanzaTarget(d.spk_id, d.spk_pk) for d in vb.devices],
        recipient_uiks=[vb.uik_pk],
        body=f"Subject: junk {i}\r\n\r\nbuy now\r\n".encode(),
        created_at=now,
        expires_at=now + 3600,
        sink=l2,
    )
    stamp = pow.mint(vb.mailbox_id, inner.digest, vb.policy.pow_bits, now) if stamped else None
    l1 = io.BytesIO()
    l2.seek(0)
    envelope.seal_outer(
        l2,
        inner.length,
        sek_id=vb.sek_id,
        sek_pk=vb.sek_pk,
        mailbox_id=vb.mailbox_id,
        not_after=now + 3600,
        sink=l1,
        stamp=stamp,
    )
    return l1.getvalue()


async def test_a_contacts_mail_is_filed_while_junk_floods_the_inbox(tmp_path: Path) -> None:
    clock = FakeClock(int(time.time()))
    dialer = DirectDialer()
    a = InboxNode(tmp_path, "inbox-a", clock, dialer)
    b = InboxNode(
        tmp_path,
        "inbox-b",
        clock,
        dialer,
        inbox={"rate_strangers_per_mailbox_per_hour": STRANGER_LIMIT},
    )
    m = InboxNode(tmp_path, "inbox-m", clock, dialer)
    alice = DeviceNode(tmp_path, "alice", a.provision("alice"), clock, dialer)
    bob = DeviceNode(tmp_path, "bob", b.provision("bob"), clock, dialer)
    mallory = m.provision("mallory")
    await a.start(worker=False)
    await b.start(worker=False)
    try:
        # bob writes first, so alice holds a token for bob's inbox when she answers
        bob.submissions.submit("bob", [alice.address], compose(bob, alice, "hello alice"))
        await bob.submissions.process_due()
        await b.worker.run_due()
        await alice.device.sync()
        assert subjects(alice, "INBOX") == ["hello alice"]

        client = InboxClient(dialer, b.onion, isolation="flood", timeout=30)
        outcomes: Counter[str] = Counter()
        stop = asyncio.Event()

        async def flood() -> None:
            i = 0
            while not stop.is_set():
                l1 = await junk(client, b, bob.device.account, mallory, i, stamped=i % 2 == 1)
                try:
                    await client.deliver(l1)
                    outcomes["accepted"] += 1
                except PermanentDeliveryError:
                    outcomes["refused"] += 1
                except TemporaryDeliveryError as exc:
                    assert exc.code == "4.7.0", exc
                    outcomes["limited"] += 1
                i += 1

        flooding = asyncio.create_task(flood())
        while outcomes["limited"] < 3 and not flooding.done():  # the strangers' door is shut
            await asyncio.sleep(0.01)
        alice.submissions.submit("alice", [bob.address], compose(alice, bob, "hello bob"))
        await alice.submissions.process_due()
        await a.worker.run_due()
        delivered = a.inbox.outbox.rows() == []
        stop.set()
        await flooding

        assert delivered, a.inbox.outbox.rows()
        assert outcomes["accepted"] == STRANGER_LIMIT
        assert outcomes["refused"] >= outcomes["limited"] >= 3
        window = clock.now() - clock.now() % 3600
        # only alice's mail was charged to bob's contacts' budget; the junk without a proof
        # was charged nowhere
        assert b.inbox.store.rate_count("mailbox", bob.device.account.mailbox_id, window) == 1
        await bob.device.sync()
        filed = subjects(bob, "INBOX")
        assert "hello bob" in filed
        # the stamped junk that got in is all there is besides (filed as unverifiable: it
        # carries no sender credentials)
        assert len(filed) == 1 + STRANGER_LIMIT
    finally:
        await alice.close()
        await bob.close()
        await a.stop()
        await b.stop()
        for inbox in (a, b, m):
            inbox.close()
