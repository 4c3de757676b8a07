"""Kept-alive connections over real onion services (onionpost/net/pool.py).

Two nodes on the private Tor network: the key fetch and the delivery of the first message
share one stream, later messages reuse it, and when the recipient's inbox drops that stream
just as the next delivery starts, the delivery goes again on a fresh stream in the same
attempt: the message arrives once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from onionpost.app.node import Node
from onionpost.base.clock import SystemClock
from onionpost.inbox import api as api_server
from onionpost.testing.mailstore import memory_mailbox, subjects
from onionpost.testing.tornet import TorNetwork
from tests.tor.nodes import eventually, make_config, send

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_deliveries_reuse_one_stream_and_survive_a_dropped_one(
    tor_network: TorNetwork, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SystemClock()
    alice = Node(
        make_config(tmp_path, "alice", tor_network), clock=clock, extensions=(memory_mailbox,)
    )
    bob = Node(make_config(tmp_path, "bob", tor_network), clock=clock, extensions=(memory_mailbox,))
    await alice.start(wait_for_tor=True)
    await bob.start(wait_for_tor=True)
    try:
        bob_onion = bob.devices["bob"].address.onion

        def inbox() -> list[str]:
            return subjects(bob, "bob")

        def stream_back() -> bool:
            # Bob files a message before his answer has crossed tor back to alice: until it
            # has, her stream is still in use, and mail sent now rightly opens a second one.
            return alice.connections.idle_count(bob_onion) == 1

        await send(alice, "alice", bob, "bob", "first")
        await eventually(lambda: "first" in inbox(), "the first message")
        await eventually(stream_back, "alice's stream back in her pool")
        # the key fetch opened the stream, the delivery reused it
        assert alice.connections.stats.opened_to[bob_onion] == 1, alice.connections.stats
        assert alice.connections.stats.reused >= 1, alice.connections.stats
        await send(alice, "alice", bob, "bob", "second")
        await eventually(lambda: "second" in inbox(), "the second message")
        await eventually(stream_back, "alice's stream back in her pool")
        assert alice.connections.stats.opened_to[bob_onion] == 1, alice.connections.stats

        # Bob's inbox drops every connection open now the moment it next receives a byte:
        # alice's kept stream dies exactly as the next delivery is sent on it.
        assert bob.server is not None and bob.server._guard is not None
        doomed = set(bob.server._guard._timers)
        original = api_server._GuardedProtocol.data_received

        def data_received(self: api_server._GuardedProtocol, data: bytes) -> None:
            if self._transport in doomed:
                doomed.discard(self._transport)
                self._transport.close()
                return
            original(self, data)

        monkeypatch.setattr(api_server._GuardedProtocol, "data_received", data_received)
        await send(alice, "alice", bob, "bob", "third")
        await eventually(lambda: "third" in inbox(), "the third message")
        assert alice.connections.stats.discarded >= 1, alice.connections.stats
        assert alice.connections.stats.opened_to[bob_onion] == 2, alice.connections.stats
        assert alice.inbox is not None
        # alice mailed only bob: every row of her outbox is one of these three
        rows = alice.inbox.outbox.rows(states=("queued", "delivered", "bounced"))
        assert [r.state for r in rows] == ["delivered"] * 3, rows
        assert [r.attempts for r in rows] == [1, 1, 1], rows  # the retry was within the attempt
        await asyncio.sleep(1.0)  # nothing more arrives late
        assert sorted(inbox()) == ["first", "second", "third"]
    finally:
        await alice.stop()
        await bob.stop()
    assert alice.connections.idle_count() == 0  # stopping closed the kept streams
