"""Two people on one node write to the same person, who answers each of them.

The regression this guards: the node's users shared one address book, so the contact token
ann registered for hal was handed to hal again in ben's mail; hal then answered ben with ann's
token, which ben's mailbox had never issued, and the answer bounced with 5.7.1.  Each person
now has their own contacts, so each grant names a token of the granter's own mailbox.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

from onionpost.app.node import Node
from onionpost.app.provision import add_user, initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load
from onionpost.core.address import Address
from onionpost.net.transport import DirectDialer
from onionpost.testing.harness import DeviceNode, InboxNode
from onionpost.testing.mailstore import filed, memory_mailbox

TIMEOUT = 30.0


def mail(sender: Address, to: Address, subject: str, text: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = str(sender)
    msg["To"] = str(to)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@test>"
    msg.set_content(text)
    return msg.as_bytes()


def inbox_texts(node: Node, user: str) -> list[str]:
    return [
        message_from_bytes(m, policy=default).get_content().strip()
        for m in filed(node, user, "INBOX")
    ]


async def until(what: str, done: Callable[[], bool], step: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not done():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        result = step()
        if asyncio.iscoroutine(result):
            await result
        await asyncio.sleep(0.1)


async def test_each_household_member_gets_their_own_answer(tmp_path: Path) -> None:
    clock = SystemClock()
    dialer = DirectDialer()
    config = load(tmp_path / "node", {"tor": {"mode": "off"}, "inbox": {"pow_bits": 8}})
    initialize(config, local="ann", device_name="laptop", now=clock.now())
    add_user(config, local="ben", device_name="laptop", now=clock.now())
    far = InboxNode(tmp_path, "far", clock, dialer)
    await far.start()
    hal = DeviceNode(tmp_path, "hal", far.provision("hal"), clock, dialer)
    node = Node(config, dialer=dialer, extensions=(memory_mailbox,))
    await node.start()
    try:
        ann, ben = node.devices["ann"], node.devices["ben"]
        for who, text in ((ann, "from ann"), (ben, "from ben")):
            report = await who.send(mail(who.address, hal.address, text, text), [hal.address])
            assert not report.failed, report.failed

        def hal_has_both() -> bool:
            texts = [
                message_from_bytes(m, policy=default).get_content().strip() for m in hal.filed()
            ]
            return sorted(texts) == ["from ann", "from ben"]

        await until("hal to receive both", hal_has_both, lambda: hal.device.sync(wait=0))

        for who in (ann, ben):
            text = f"hello {who.account.local}"
            report = await hal.device.send(
                mail(hal.address, who.address, text, text), [who.address]
            )
            assert not report.failed, report.failed

        def answered() -> bool:
            return not far.inbox.outbox.rows()

        await until("hal's inbox to hand over both answers", answered, lambda: None)
        outcomes = far.inbox.outbox.rows(states=("delivered", "bounced", "cancelled"))
        assert len(outcomes) == 2
        assert all(r.state == "delivered" for r in outcomes), [
            (r.onion, r.state, r.last_error) for r in outcomes
        ]

        def filed() -> bool:
            return bool(inbox_texts(node, "ann")) and bool(inbox_texts(node, "ben"))

        await until("the answers to be filed", filed, lambda: None)
        assert inbox_texts(node, "ann") == ["hello ann"]
        assert inbox_texts(node, "ben") == ["hello ben"]
    finally:
        await node.stop()
        await hal.close()
        await far.stop()
        far.close()


async def test_a_user_removed_while_the_node_runs_is_dropped(tmp_path: Path) -> None:
    """`onionpost users remove` pokes the node (SIGUSR1, as `onionpost run` wires it); the
    node stops ben's device and nothing brings his files back, while ann carries on."""
    from onionpost.app import admin

    clock = SystemClock()
    dialer = DirectDialer()
    config = load(tmp_path / "node", {"tor": {"mode": "off"}, "inbox": {"pow_bits": 8}})
    initialize(config, local="ann", device_name="laptop", now=clock.now())
    add_user(config, local="ben", device_name="laptop", now=clock.now())
    node = Node(config, dialer=dialer, extensions=(memory_mailbox,))
    await node.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, node.wake)
    try:
        await node._write_status()  # so that admin.poke finds this (in-process) node
        ben = node.devices["ben"]
        with admin.opened(config) as local:
            removed = admin.remove_user(local, "ben")
        assert removed.mailbox
        await until("the node to drop ben", lambda: "ben" not in node.devices, lambda: None)
        assert ben._task is None  # its sync loop was stopped
        assert set(node.devices) == {"ann"}
        await node.maintain_keys()  # a key job after the removal
        assert not (tmp_path / "node" / "users" / "ben").exists()
        assert node.inbox is not None and node.inbox.store.mailbox_by_local("ben") is None

        ann = node.devices["ann"]
        report = await ann.send(mail(ann.address, ann.address, "still", "here"), [ann.address])
        assert not report.failed, report.failed
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        await node.stop()
