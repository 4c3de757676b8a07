"""Two complete nodes exchange mail over real onion services on the private Tor network.

Each node launches its own tor (joined to the test network), publishes its inbox as an onion
service, and reaches the other only through tor: no static routes.  Covered: mail both ways,
a node restart keeping its address, tor killed under a running node, and a recipient inbox
that is down (temporary errors) and then comes back.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from onionpost.testing.mailstore import subjects
from onionpost.testing.tornet import TorNetwork
from tests.tor.nodes import eventually, running, send, tor_node

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_two_nodes_mail_each_other_through_tor(
    tor_network: TorNetwork, tmp_path: Path
) -> None:
    async with running(tmp_path, tor_network, "alice", "bob") as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        assert alice.tor is not None and bob.tor is not None
        a_onion = alice.devices["alice"].address.onion
        assert alice.tor.status().onion == a_onion and alice.tor.status().published
        assert bob.tor.status().pow_enabled, bob.tor.status().pow_note

        await send(alice, "alice", bob, "bob", "hello bob")
        await eventually(lambda: subjects(bob, "bob") == ["hello bob"], "alice's mail at bob")
        await send(bob, "bob", alice, "alice", "hello alice")  # bob now holds alice's token
        await eventually(lambda: subjects(alice, "alice") == ["hello alice"], "bob's reply")

        # alice's node restarts: same onion address, and mail still reaches her
        await alice.stop()
        nodes["alice"] = alice = tor_node(tmp_path, "alice", tor_network)
        await alice.start(wait_for_tor=True)
        assert alice.tor is not None and alice.tor.status().onion == a_onion
        await send(bob, "bob", alice, "alice", "after restart")
        await eventually(
            lambda: "after restart" in subjects(alice, "alice"), "mail after alice's restart"
        )

        # tor dies under bob's running node; the health check brings it back
        pid = bob.tor.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await bob.tor.check_health()
        assert bob.tor.status().published and bob.tor.pid != pid
        await send(alice, "alice", bob, "bob", "after tor died")
        await eventually(lambda: "after tor died" in subjects(bob, "bob"), "mail after tor died")

        # bob's node is down: alice's outbox holds the mail and says why, then delivers
        await bob.stop()
        await send(alice, "alice", bob, "bob", "while bob was down")
        assert alice.inbox is not None

        def deferred() -> bool:
            rows = alice.inbox.outbox.rows() if alice.inbox else []
            return bool(rows) and rows[0].attempts >= 1 and bool(rows[0].last_error)

        # The first attempt may go out on the stream alice kept to bob's node, whose circuit
        # can die silently: it is given up after reused_answer_timeout (60 s) and the
        # request dialled afresh, which fails within the dial's own timeout.  90 s was not
        # enough for both on a fresh Debian 12 root running two test suites at once.
        await eventually(deferred, "a failed delivery attempt", timeout=240)
        row = alice.inbox.outbox.rows()[0]
        assert row.last_error_code.startswith("4."), row
        assert "inbox" in row.last_error.lower()
        nodes["bob"] = bob = tor_node(tmp_path, "bob", tor_network)
        await bob.start(wait_for_tor=True)
        alice.wake()
        await eventually(
            lambda: "while bob was down" in subjects(bob, "bob"),
            "delivery after bob returned",
            timeout=150,
        )
