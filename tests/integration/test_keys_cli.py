"""`onionpost keys` shows this machine's keys; `keys rotate` makes the running node rotate
every key now and publish them (the node owns the key files while it runs)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load
from onionpost.core.crypto.bundle import KeyBundle
from onionpost.testing.mailstore import memory_mailbox

from .test_enrolment import acli, eventually, free_port, tor_off, write_config


async def test_keys_listing_and_rotation_by_the_running_node(tmp_path: Path) -> None:
    home = tmp_path / "node"
    write_config(home, tor_off({}, f"listen_port = {free_port()}\n"))
    initialize(load(home), local="alice", device_name="laptop", now=int(SystemClock().now()))
    code, out = await acli(home, "keys", "rotate")
    assert code == 1 and "not running" in out
    node = Node(load(home), extensions=(memory_mailbox,))
    await node.start()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, node.wake)
    try:
        code, out = await acli(home, "keys")
        assert code == 0, out
        assert "device signing key #0" in out and "identity key (held here)" in out
        assert "server envelope key" in out
        assert node.inbox is not None
        sek_before = node.inbox.secrets.current().sek_id
        device = node.devices["alice"]
        code, out = await acli(home, "keys", "rotate")
        assert code == 0, out
        await eventually(lambda: device.account.device.dsk_seq == 1, "the node to rotate")
        assert node.inbox.secrets.current().sek_id != sek_before

        def published() -> bool:
            assert node.inbox is not None
            bundle = KeyBundle.parse(node.inbox.bundle("alice", node.clock.now() + 120))
            return bundle.binding.sek_id == node.inbox.secrets.current().sek_id

        await eventually(published, "the new keys at the inbox")
        code, out = await acli(home, "keys")
        assert "device signing key #1" in out
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        await node.stop()
