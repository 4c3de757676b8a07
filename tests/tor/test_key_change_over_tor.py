"""A contact's identity key changes, over real onion services on the private Tor network.

alice and bob (two complete nodes, each with its own tor) write to each other; then bob's
person is made again on his node with a new identity key under the same onion address (what
a reinstall without the backup does, and what whoever holds bob's inbox could do).  His
mail is held in alice's Quarantine with a notice; a wrong fingerprint is refused and the
right one pinned, after which mail flows both ways.  Then bob's key changes once more and
alice rejects it: the old pin stays and the rejected key's mail is refused.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from onionpost.app import admin
from onionpost.app.node import Node
from onionpost.app.provision import add_user
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.errors import FingerprintMismatch
from onionpost.core.trust import KEY_CHANGE_HEADER, QUARANTINE
from onionpost.testing.mailstore import filed, subjects
from onionpost.testing.tornet import TorNetwork
from tests.tor.nodes import eventually, send, tor_node

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _new_bob(bob: Node, tmp_path: Path, net: TorNetwork) -> tuple[Node, bytes]:
    """bob's person removed and added again on his stopped node: same address, new key."""
    config = bob.config
    await bob.stop()
    with admin.opened(config) as local:
        admin.remove_user(local, "bob")
    add_user(config, local="bob", device_name="laptop", now=int(time.time()))
    bob = tor_node(tmp_path, "bob", net)
    await bob.start(wait_for_tor=True)
    return bob, bob.devices["bob"].account.uik_pk


async def test_key_change_held_then_accepted_then_rejected_over_tor(
    tor_network: TorNetwork, tmp_path: Path
) -> None:
    alice = tor_node(tmp_path, "alice", tor_network)
    bob = tor_node(tmp_path, "bob", tor_network)
    await alice.start(wait_for_tor=True)
    await bob.start(wait_for_tor=True)
    # accept-key and reject-key poke the running node (SIGUSR1), as `onionpost run` wires it
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, alice.wake)
    try:
        bob_address = str(bob.devices["bob"].address)
        first_uik = bob.devices["bob"].account.uik_pk
        await send(alice, "alice", bob, "bob", "hello bob")
        await eventually(lambda: subjects(bob, "bob") == ["hello bob"], "alice's mail at bob")
        await send(bob, "bob", alice, "alice", "hello alice")
        await eventually(lambda: subjects(alice, "alice") == ["hello alice"], "bob's reply")

        bob, second_uik = await _new_bob(bob, tmp_path, tor_network)
        assert str(bob.devices["bob"].address) == bob_address and second_uik != first_uik
        await send(bob, "bob", alice, "alice", "from the new key")
        await eventually(
            lambda: subjects(alice, "alice", QUARANTINE) == ["from the new key"],
            "bob's mail held in alice's Quarantine",
            timeout=150,
        )
        (held,) = filed(alice, "alice", QUARANTINE)
        assert f"{KEY_CHANGE_HEADER}: HELD".encode() in held
        await eventually(lambda: len(subjects(alice, "alice")) == 2, "the key-change notice")
        assert bob_address in subjects(alice, "alice")[1]

        with admin.opened(alice.config) as local:
            (view,) = admin.key_changes(local, bob_address, "alice")
            assert view.new_fingerprint == fingerprint(second_uik)
            with pytest.raises(FingerprintMismatch):
                admin.accept_key(local, bob_address, fingerprint(first_uik), "alice")
            admin.accept_key(local, bob_address, fingerprint(second_uik), "alice")

        await send(bob, "bob", alice, "alice", "after acceptance")
        await eventually(
            lambda: subjects(alice, "alice")[-1:] == ["after acceptance"], "bob's mail in INBOX"
        )
        await send(alice, "alice", bob, "bob", "welcome back")
        await eventually(lambda: subjects(bob, "bob") == ["welcome back"], "alice's mail at bob")

        # once more, and this time alice rejects it
        bob, third_uik = await _new_bob(bob, tmp_path, tor_network)
        await send(bob, "bob", alice, "alice", "from a third key")
        await eventually(
            lambda: "from a third key" in subjects(alice, "alice", QUARANTINE),
            "the third key's mail held",
            timeout=150,
        )
        with admin.opened(alice.config) as local:
            (rejected,) = admin.reject_key(local, bob_address, "alice")
            assert rejected.new_uik == third_uik
            (contact,) = admin.contacts(local, "alice")
            assert contact.contact.uik_pk == second_uik  # the old pin stays

        assert alice.inbox is not None
        account = alice.devices["alice"].account
        before = len(filed(alice, "alice")) + len(filed(alice, "alice", QUARANTINE))
        await send(bob, "bob", alice, "alice", "after the rejection")
        # bob's node delivers it (his two messages since the change); alice's device takes
        # it from her inbox and files nothing
        outbox = bob.inbox.outbox if bob.inbox else None
        assert outbox is not None
        await eventually(
            lambda: len(outbox.rows(states=("delivered",))) >= 2,
            "delivery of the rejected key's mail to alice's inbox",
            timeout=150,
        )
        spool = alice.inbox.store
        await eventually(
            lambda: spool.pending(account.mailbox_id, account.device.device_id) == [],
            "alice's device taking it",
        )
        after = len(filed(alice, "alice")) + len(filed(alice, "alice", QUARANTINE))
        assert after == before
        with admin.opened(alice.config) as local:
            assert admin.identity_changes(local, "alice") == []
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        await alice.stop()
        await bob.stop()
