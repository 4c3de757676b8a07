"""`onionpost status` on a node whose inbox is a real onion service (private test network)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from onionpost.app.cli import cli
from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load
from onionpost.testing.tornet import TorNetwork

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_status_shows_tor_and_the_published_onion(
    tor_network: TorNetwork, tmp_path: Path
) -> None:
    home = tmp_path / "node"
    initialize(load(home), local="alice", device_name="laptop", now=int(time.time()))
    node = Node(
        load(home, {"tor": {"extra_torrc": tor_network.client_torrc_lines()}}), clock=SystemClock()
    )
    await node.start(wait_for_tor=True)
    try:
        await node._write_status()
        result = CliRunner().invoke(cli, ["--data-dir", str(home), "status"])
        out = result.output
        assert result.exit_code == 0, out
        onion = node.devices["alice"].address.onion
        assert "node:       running" in out
        assert f"{onion}.onion, published" in out
        assert "launch, healthy" in out and "bootstrap 100%" in out
        assert "proof-of-work defence on" in out
    finally:
        await node.stop()
