"""A profile crosses the private Tor network both ways: in a message and in a bundle.

alice publishes a profile at her node's inbox; her mail to bob carries its card through
onion services and bob's node files it with her verified name in From (a different name
the message claims is marked); bob's reply makes his node fetch alice's bundle over tor and
verify her profile there.
"""

from __future__ import annotations

import time
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest

from onionpost.app.node import Node
from onionpost.core.account import sign_profile
from onionpost.core.wire import KeyUpdate
from onionpost.testing.mailstore import filed
from onionpost.testing.tornet import TorNetwork
from tests.tor.nodes import eventually, mail, running

pytestmark = pytest.mark.asyncio(loop_scope="session")


def froms(node: Node, user: str) -> dict[str, str]:
    out = {}
    for raw in filed(node, user):
        msg = message_from_bytes(raw, policy=default)
        out[str(msg["Subject"])] = str(msg["From"])
    return out


async def test_a_verified_name_crosses_tor_in_mail_and_in_bundles(
    tor_network: TorNetwork, tmp_path: Path
) -> None:
    async with running(tmp_path, tor_network, "alice", "bob") as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        assert alice.inbox is not None and alice.submissions is not None
        assert bob.submissions is not None
        device = alice.devices["alice"]
        profile, card = sign_profile(
            device.account,
            display_name="Alice Liddell",
            avatar_type="",
            avatar=b"",
            now=int(time.time()),
        )
        alice.inbox.publish(device.account.mailbox_id, KeyUpdate(profile=profile), int(time.time()))
        assert device.adopt_profile(profile, card)

        a, b = device.address, bob.devices["bob"].address
        alice.submissions.submit("alice", [b], mail(str(a), str(b), "plain"))
        alice.submissions.submit("alice", [b], mail(f"Your Bank <{a}>", str(b), "claiming"))
        await eventually(lambda: len(froms(bob, "bob")) == 2, "alice's mail at bob")
        assert froms(bob, "bob") == {
            "plain": f"Alice Liddell <{a}>",
            "claiming": f'"Alice Liddell (unverified: Your Bank)" <{a}>',
        }

        # bob writes back: his node fetches alice's bundle over tor and verifies her profile
        bob.devices["bob"].directory.forget(a)
        bob.submissions.submit("bob", [a], mail(str(b), str(a), "reply"))
        await eventually(lambda: "reply" in froms(alice, "alice"), "bob's reply at alice")
        contact = bob.devices["bob"].contacts.get(str(a))
        assert contact is not None and contact.display_name == "Alice Liddell"
