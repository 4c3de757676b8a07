"""New mail waits while the disk is nearly full: a clear, temporary refusal, nothing half-stored.

A node keeps ``min_free_mib`` free on its data directory's disk.  These tests ask for more than
the test machine's whole disk (so the refusal comes from a real statvfs, not a stand-in), see
the refusal each sender gets, then give the room back and see the same mail go through.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.service import start_gateway
from gateway.setup import setup_account
from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load
from onionpost.store.disk import DiskRoom, MiB
from onionpost.store.submissions import SubmissionStore
from onionpost.testing.harness import compose, subjects

from .test_enrolment import free_port, tor_off, write_config
from .test_store_and_forward import World  # two inboxes: alice at a, bob at b


def beyond_the_disk(path: Path) -> int:
    """A reserve, in MiB, larger than the whole disk ``path`` is on."""
    return shutil.disk_usage(path).total // MiB + 1024


async def test_a_mail_client_hears_452_4_3_1_and_sends_once_there_is_room(
    mail_tmp: Path,
) -> None:
    home = mail_tmp / "alice"
    port = free_port()
    write_config(home, tor_off({}, f"listen_port = {port}\n"))
    now = int(SystemClock().now())
    made = initialize(
        load(home), local="alice", device_name="pi", now=now, gateway_setup=setup_account
    )
    assert made.password is not None
    gateway = "[gateway]\nsmtp_port = 0\nimap_port = 0\nautoconfig_port = 0\n"

    def configure(reserve_mib: int) -> None:
        write_config(
            home,
            f"min_free_mib = {reserve_mib}\n" + tor_off({}, f"listen_port = {port}\n") + gateway,
        )

    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = str(made.address), str(made.address), "room?"
    msg.set_content("Is there room for this?")

    def send(node: Node) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", node.gateway_ports["smtp"], timeout=60) as client:
            client.login("alice", made.password)
            try:
                client.send_message(msg)
            except smtplib.SMTPDataError as exc:
                return exc.smtp_code, exc.smtp_error
            return 250, b""

    configure(beyond_the_disk(home))
    node = Node(load(home), extensions=(start_gateway,))
    await node.start()
    try:
        code, text = await asyncio.to_thread(send, node)
        assert (code, text[:6]) == (452, b"4.3.1 "), text
        assert b"disk is nearly full" in text and b"send it again" in text
        assert SubmissionStore(node.device_db).listing() == []  # nothing half-stored
    finally:
        await node.stop()

    configure(64)  # the default: this disk has room for that
    node = Node(load(home), extensions=(start_gateway,))
    await node.start()
    try:
        assert await asyncio.to_thread(send, node) == (250, b"")
    finally:
        await node.stop()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


async def test_a_delivery_waits_in_the_senders_outbox_while_the_recipients_disk_is_full(
    world: World, tmp_path: Path
) -> None:
    w = world
    w.b.inbox.room = DiskRoom(tmp_path, reserve_mib=beyond_the_disk(tmp_path))
    w.alice.submissions.submit("alice", [w.bob.address], compose(w.alice, w.bob, "roomy?"))
    await w.alice.submissions.process_due()
    await w.a.worker.run_due()
    (row,) = w.a.inbox.outbox.rows()  # still queued at alice's inbox: temporary
    assert row.last_error_code == "4.3.1"
    assert (
        row.last_error == "The recipient's inbox is short of disk space; delivery will be retried."
    )
    assert await w.bob.device.sync() == 0  # nothing reached bob's inbox

    w.b.inbox.room = DiskRoom(tmp_path, reserve_mib=64)  # space was freed
    w.clock.advance(3600)
    await w.a.worker.run_due()
    assert w.a.inbox.outbox.rows() == []
    await w.bob.device.sync()
    assert subjects(w.bob, "INBOX") == ["roomy?"]
