"""Two inboxes, five devices, real end-to-end encrypted mail over loopback HTTP.

Inbox A hosts alice (laptop + phone); inbox B hosts bob (laptop + phone) and carol (one
device).  Everything is real: SQLite files, the node API over TCP, the outbox worker, sync.
"""

from __future__ import annotations

import asyncio
import os
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest

from onionpost.base.clock import SystemClock
from onionpost.net.transport import DirectDialer
from onionpost.testing.harness import DeviceNode, InboxNode


def mail(
    sender: DeviceNode,
    to: list[DeviceNode],
    subject: str,
    text: str,
    attachment: bytes | None = None,
) -> bytes:
    msg = EmailMessage()
    msg["From"] = str(sender.address)
    msg["To"] = ", ".join(str(t.address) for t in to)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@test>"
    msg.set_content(text)
    if attachment is not None:
        msg.add_attachment(
            attachment, maintype="application", subtype="octet-stream", filename="data.bin"
        )
    return msg.as_bytes()


#: The inboxes of the running ``households`` fixture: drain waits for their outboxes.
_INBOXES: list[InboxNode] = []


async def _outboxes_empty(deadline: float = 300.0) -> None:
    """Wait until no inbox has mail queued to deliver: a 25 MiB delivery on a loaded machine
    takes longer than any fixed pause."""
    loop = asyncio.get_running_loop()
    until = loop.time() + deadline
    while any(i.inbox.outbox.queued_count() for i in _INBOXES) and loop.time() < until:
        await asyncio.sleep(0.05)


async def drain(*devices: DeviceNode, rounds: int = 20) -> None:
    """Let the outbox deliver and every device sync until nothing more arrives."""
    for _ in range(rounds):
        await _outboxes_empty()
        got = 0
        for d in devices:
            got += await d.device.sync(wait=0)
        if got == 0:
            await asyncio.sleep(0.2)
            again = sum([await d.device.sync(wait=0) for d in devices])
            if again == 0:
                return


def folder(d: DeviceNode, name: str) -> list[bytes]:
    return d.filed(name)


@pytest.fixture
async def households(tmp_path: Path):
    clock = SystemClock()
    dialer = DirectDialer()
    a = InboxNode(tmp_path, "inbox-a", clock, dialer)
    b = InboxNode(tmp_path, "inbox-b", clock, dialer)
    await a.start()
    await b.start()
    _INBOXES[:] = [a, b]
    alice = a.provision("alice", "laptop")
    alice_phone = a.add_device(alice, "phone")
    bob = b.provision("bob", "laptop")
    bob_phone = b.add_device(bob, "phone")
    carol = b.provision("carol", "tablet")
    devs = {
        "alice": DeviceNode(tmp_path, "alice-laptop", alice, clock, dialer),
        "alice_phone": DeviceNode(tmp_path, "alice-phone", alice_phone, clock, dialer),
        "bob": DeviceNode(tmp_path, "bob-laptop", bob, clock, dialer),
        "bob_phone": DeviceNode(tmp_path, "bob-phone", bob_phone, clock, dialer),
        "carol": DeviceNode(tmp_path, "carol-tablet", carol, clock, dialer),
    }
    try:
        yield devs
    finally:
        for d in devs.values():
            await d.close()
        _INBOXES.clear()
        await a.stop()
        await b.stop()
        a.close()
        b.close()


async def test_alice_mails_bob_and_carol_and_bob_replies(households) -> None:
    d = households
    body = mail(d["alice"], [d["bob"], d["carol"]], "dinner", "Dinner on Friday?")
    report = await d["alice"].device.send(
        body, [d["bob"].address, d["carol"].address], "<dinner@test>"
    )
    assert not report.failed, report.failed
    assert set(report.queued) == {
        str(d["bob"].address),
        str(d["carol"].address),
        str(d["alice"].address),
    }
    await drain(*d.values())
    for who in ("bob", "bob_phone", "carol"):
        inbox = folder(d[who], "INBOX")
        assert len(inbox) == 1, who
        got = message_from_bytes(inbox[0], policy=default)
        assert got["Subject"] == "dinner"
        assert got.get_content().strip() == "Dinner on Friday?"
        assert got["X-Onionpost-Verified"].startswith(str(d["alice"].address))
    sent = folder(d["alice_phone"], "Sent")
    assert len(sent) == 1 and b"Dinner on Friday?" in sent[0]
    assert folder(d["alice"], "INBOX") == [] and folder(d["alice_phone"], "INBOX") == []

    # bob replies; alice's grant lets him deliver with a contact token instead of work
    contact = d["bob"].contacts.get(str(d["alice"].address))
    assert contact is not None and contact.token_to_them is not None
    reply = mail(d["bob"], [d["alice"]], "re dinner", "Yes!")
    report = await d["bob"].device.send(reply, [d["alice"].address])
    assert not report.failed, report.failed
    await drain(*d.values())
    for who in ("alice", "alice_phone"):
        inbox = folder(d[who], "INBOX")
        assert len(inbox) == 1 and b"Yes!" in inbox[0], who
    assert len(folder(d["bob_phone"], "Sent")) == 1


async def test_a_25_mib_attachment_arrives_byte_identical(households) -> None:
    d = households
    blob = os.urandom(25 * 1024 * 1024)
    body = mail(d["alice"], [d["bob"]], "big", "see attached", attachment=blob)
    report = await d["alice"].device.send(body, [d["bob"].address])
    assert not report.failed, report.failed
    await drain(d["bob"], d["alice_phone"])
    (got,) = folder(d["bob"], "INBOX")
    parts = [p for p in message_from_bytes(got, policy=default).iter_attachments()]
    assert parts[0].get_content() == blob


async def test_offline_phone_gets_everything_once_when_it_returns(households) -> None:
    d = households
    for i in range(3):
        body = mail(d["alice"], [d["bob"]], f"note {i}", f"note number {i}")
        await d["alice"].device.send(body, [d["bob"].address])
    await drain(d["bob"], d["carol"], d["alice_phone"])  # bob's phone stays off
    assert len(folder(d["bob"], "INBOX")) == 3
    assert folder(d["bob_phone"], "INBOX") == []
    await drain(d["bob_phone"])
    await drain(d["bob_phone"])
    subjects = sorted(
        message_from_bytes(m, policy=default)["Subject"] for m in folder(d["bob_phone"], "INBOX")
    )
    assert subjects == ["note 0", "note 1", "note 2"]


async def test_bcc_recipients_do_not_see_each_other(households) -> None:
    d = households
    msg = EmailMessage()
    msg["From"] = str(d["alice"].address)
    msg["To"] = str(d["bob"].address)
    msg["Bcc"] = str(d["carol"].address)
    msg["Subject"] = "secret cc"
    msg.set_content("hi")
    report = await d["alice"].device.send(msg.as_bytes(), [d["bob"].address, d["carol"].address])
    assert not report.failed
    await drain(*d.values())
    for who in ("bob", "carol"):
        (got,) = folder(d[who], "INBOX")
        assert b"Bcc" not in got.split(b"\r\n\r\n")[0]
    (sent,) = folder(d["alice_phone"], "Sent")
    assert b"Bcc:" in sent


async def test_a_message_altered_at_the_inbox_becomes_a_notice(tmp_path: Path) -> None:
    """The recipient's inbox (or its disk) corrupts a spooled message: the device refuses to
    show it, files a notice naming the failure instead, and clears it from the spool."""
    clock = SystemClock()
    dialer = DirectDialer()
    a = InboxNode(tmp_path, "a", clock, dialer)
    b = InboxNode(tmp_path, "b", clock, dialer)
    await a.start()
    await b.start()
    alice = DeviceNode(tmp_path, "alice", a.provision("alice"), clock, dialer)
    bob = DeviceNode(tmp_path, "bob", b.provision("bob"), clock, dialer)
    try:
        await alice.device.send(mail(alice, [bob], "genuine", "the real text"), [bob.address])
        for _ in range(2400):  # up to two minutes: the delivery is asynchronous
            if b.inbox.store.usage(bob.device.account.mailbox_id):
                break
            await asyncio.sleep(0.05)
        row = b.db.one("SELECT id, data FROM sealed")
        assert row is not None
        data = bytearray(row["data"])
        data[len(data) // 2] ^= 0x01  # one bit, deep inside the encrypted body
        with b.db.transaction() as c:
            c.execute("UPDATE sealed SET data = ? WHERE id = ?", (bytes(data), row["id"]))
        await bob.device.sync()
        (notice,) = folder(bob, "INBOX")
        parsed = message_from_bytes(notice, policy=default)
        assert parsed["Subject"] == "A message could not be verified"
        body = parsed.get_content()
        assert "Reason: Part of the message body was altered in transit." in body
        # nothing of an unauthenticated message is believed, not even who claims to send it
        assert "Claimed sender: unknown" in body
        assert b"the real text" not in notice
        assert await bob.device.session.pending() == []  # acknowledged: not retried forever
        await bob.device.sync()
        assert len(folder(bob, "INBOX")) == 1  # and only one notice
    finally:
        await alice.close()
        await bob.close()
        await a.stop()
        await b.stop()
        a.close()
        b.close()
