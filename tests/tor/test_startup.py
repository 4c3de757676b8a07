"""A node starts at once and brings tor up in the background; only a missing tor stops it.

The tor here is pointed at a directory authority on 127.0.0.1 where nothing listens, so it
can never finish bootstrapping, and never tries to reach anything but this machine.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from onionpost.app.cli import cli
from onionpost.app.node import Node
from onionpost.app.provision import add_user, initialize
from onionpost.base.config import load
from onionpost.core.errors import PeerUnreachable, TorNotInstalled
from onionpost.testing.mailstore import filed, memory_mailbox

pytestmark = pytest.mark.asyncio(loop_scope="session")

NOWHERE = [
    "TestingTorNetwork 1",
    "DirAuthority nowhere orport=9 no-v2 v3ident=" + "A" * 40 + " 127.0.0.1:9 " + "B" * 40,
]


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    initialize(load(home), local="alice", device_name="laptop", now=int(time.time()))
    add_user(load(home), local="carol", device_name="laptop", now=int(time.time()))
    return home


async def test_missing_tor_stops_the_node_with_one_sentence(tmp_path: Path) -> None:
    node = Node(
        load(_home(tmp_path), {"tor": {"tor_binary": "/nonexistent/tor"}}),
        extensions=(memory_mailbox,),
    )
    with pytest.raises(TorNotInstalled, match="apt-get install tor"):
        await node.start()


async def test_the_node_runs_while_tor_is_still_connecting(tmp_path: Path) -> None:
    home = _home(tmp_path)
    node = Node(
        load(home, {"tor": {"extra_torrc": NOWHERE, "bootstrap_timeout": 600}}),
        extensions=(memory_mailbox,),
    )
    await node.start()
    try:
        # start() returned while tor is still connecting (it cannot finish: NOWHERE), so it
        # did not wait for tor, however long this machine takes to start a node.
        status = node.status()["tor"]
        assert status["mode"] == "launch" and status["healthy"] is False
        assert status["published"] is False and status["bootstrap_percent"] < 100
        # `onionpost status` says what tor is doing, not "?" and "-.onion"
        await node._write_status()
        out = CliRunner().invoke(cli, ["--data-dir", str(home), "status"]).output
        onion = node.devices["alice"].address.onion
        assert "tor:        launch, starting" in out, out
        assert f"onion:      {onion}.onion, not published yet (tor is starting)" in out
        assert "?" not in out and "-.onion" not in out
        # mail between the two local users needs no tor at all
        alice, carol = node.devices["alice"], node.devices["carol"]
        assert node.submissions is not None
        node.submissions.submit(
            "alice", [carol.address], f"From: {alice.address}\r\nSubject: hi\r\n\r\nx\r\n".encode()
        )
        node.wake()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if filed(node, "carol"):
                break
            await asyncio.sleep(0.1)
        assert len(filed(node, "carol")) == 1
        # a remote inbox is "not yet": a temporary error that says why
        with pytest.raises(PeerUnreachable, match="still connecting"):
            await node.dialer.open("x" * 56, 80, isolation="t", timeout=5)
    finally:
        await node.stop()
