"""Block, unblock and a contacts-only mailbox, three complete nodes over the private Tor network.

The people act through the real CLI (`onionpost contacts block|unblock|policy`, `status
--json`), run as separate processes beside their in-process node, exactly as beside a running
`onionpost run`: the command changes the databases and pokes the node (SIGUSR1, which this
module routes to the nodes' ``wake`` as lifecycle.serve does).  What is checked is what each
person sees: the refused sender a bounce in INBOX with the inbox's words; the person nothing.
The same flows on loopback, with more corners, are tests/integration/test_blocking.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from email import message_from_bytes
from email.policy import default
from pathlib import Path

import pytest
import pytest_asyncio

from onionpost.app.node import Node
from onionpost.inbox.postoffice import CONTACTS_ONLY, TOKEN_REFUSED
from onionpost.testing.mailstore import filed, subjects
from onionpost.testing.tornet import TorNetwork
from tests.tor.nodes import eventually, running, send

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
BOUNCE = "Undelivered Mail Returned to Sender"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def people(
    tor_network: TorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[dict[str, Node]]:
    """alice, bob and carol, each on a node of their own; started once for this module."""
    root = tmp_path_factory.mktemp("trust")
    started: dict[str, Node] = {}
    loop = asyncio.get_running_loop()
    # The CLI pokes the node whose status.json it finds: here, this process.
    loop.add_signal_handler(signal.SIGUSR1, lambda: [n.wake() for n in started.values()])
    try:
        async with running(root, tor_network, "alice", "bob", "carol", together=True) as nodes:
            started.update(nodes)
            yield nodes
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


async def cli(node: Node, *args: str) -> str:
    """`onionpost --data-dir <node's> ARGS` in a process of its own; its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "onionpost",
        "--data-dir",
        str(node.config.data_dir),
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await proc.communicate())[0].decode()
    assert proc.returncode == 0 and "Traceback" not in out, out
    return out


def bounce_of(node: Node, user: str, subject: str) -> str | None:
    """The bounce filed in ``user``'s INBOX for their message ``subject``, as text."""
    for raw in filed(node, user):
        msg = message_from_bytes(raw, policy=default)
        if str(msg["Subject"]) == BOUNCE and f"Subject: {subject}".encode() in raw:
            return raw.decode(errors="replace")
    return None


def strangers(node: Node) -> int:
    """How many strangers' messages (with a proof of work) the node's inbox has taken."""
    assert node.inbox is not None
    return int(
        node.inbox.store.db.scalar(
            "SELECT coalesce(sum(count), 0) FROM rate_counters WHERE scope = 'strangers'"
        )
    )


async def test_block_bounces_vaguely_and_unblock_makes_a_stranger(people: dict[str, Node]) -> None:
    alice, bob = people["alice"], people["bob"]
    a, b = alice.devices["alice"], bob.devices["bob"]
    await send(alice, "alice", bob, "bob", "hello bob")
    await eventually(lambda: "hello bob" in subjects(bob, "bob"), "alice's mail at bob")
    await send(bob, "bob", alice, "alice", "hello alice")  # alice now holds bob's token
    await eventually(lambda: "hello alice" in subjects(alice, "alice"), "bob's reply")
    bob_for_alice = a.contacts.get(str(b.address))
    assert bob_for_alice is not None and bob_for_alice.token_to_them is not None

    out = await cli(bob, "contacts", "block", str(a.address))
    assert "is blocked" in out, out

    # alice's next mail presents the withdrawn token: refused at bob's inbox, bounced to her
    await send(alice, "alice", bob, "bob", "after the block")
    await eventually(
        lambda: bounce_of(alice, "alice", "after the block"), "alice's bounce", timeout=150
    )
    bounce = bounce_of(alice, "alice", "after the block")
    assert bounce is not None
    assert "Status: 5.7.1" in bounce and TOKEN_REFUSED in bounce
    # deliberately vague: nothing before the returned headers says "block"
    assert "block" not in bounce.split("text/rfc822-headers")[0].lower()
    assert "after the block" not in subjects(bob, "bob")  # nothing reached bob
    # alice's device drops the refused token: from now on she writes as a stranger
    await eventually(
        lambda: a.contacts.get(str(b.address)).token_to_them is None,  # type: ignore[union-attr]
        "alice's device to forget the refused token",
    )

    out = await cli(bob, "contacts", "unblock", str(a.address))
    assert "no longer blocked" in out, out
    alice_at_bob = b.contacts.get(str(a.address))
    assert alice_at_bob is not None and alice_at_bob.token_from_them is None  # nothing restored

    before = strangers(bob)
    await send(alice, "alice", bob, "bob", "after unblocking")
    await eventually(lambda: "after unblocking" in subjects(bob, "bob"), "alice's mail again")
    assert strangers(bob) == before + 1  # it came as a stranger's, with a proof of work
    assert "after the block" not in subjects(bob, "bob")


async def test_contacts_only_refuses_a_stranger_and_lets_a_contact_in(
    people: dict[str, Node],
) -> None:
    alice, bob, carol = people["alice"], people["bob"], people["carol"]
    a, c = alice.devices["alice"], carol.devices["carol"]
    # bob is carol's contact: she wrote to him, which gave him a token for her mailbox
    await send(carol, "carol", bob, "bob", "hello bob from carol")
    await eventually(lambda: "hello bob from carol" in subjects(bob, "bob"), "carol's mail")
    await eventually(
        lambda: getattr(bob.devices["bob"].contacts.get(str(c.address)), "token_to_them", None),
        "bob's token for carol",
    )
    # alice is a stranger to carol; her node keeps carol's (open) keys while she writes
    a.directory.fresh_seconds = 3600.0
    await send(alice, "alice", carol, "carol", "hello carol")
    await eventually(lambda: "hello carol" in subjects(carol, "carol"), "alice's first mail")

    assert "contacts-only" in await cli(carol, "contacts", "policy", "contacts-only")
    info = json.loads(await cli(carol, "status", "--json"))
    assert info["policies"] == {"carol": "contacts-only"}, info
    assert "mail from:  contacts-only" in await cli(carol, "status")

    # sealed against the keys alice's node still held (open): carol's inbox refuses it
    # with the specified words, and alice gets the bounce
    await send(alice, "alice", carol, "carol", "refused as a stranger")
    await eventually(
        lambda: bounce_of(alice, "alice", "refused as a stranger"),
        "the contacts-only bounce",
        timeout=150,
    )
    bounce = bounce_of(alice, "alice", "refused as a stranger")
    assert bounce is not None and "Status: 5.7.1" in bounce
    assert CONTACTS_ONLY in " ".join(bounce.split()), bounce

    # with carol's current keys, alice's node does not even try: the message waits, saying why
    a.directory.fresh_seconds = 60.0
    a.directory.forget(c.address)
    await send(alice, "alice", carol, "carol", "sealed against the closed mailbox")
    assert alice.submissions is not None
    listing = alice.submissions.store.listing

    def held() -> bool:
        return any("contacts only" in (p.last_error or "") for p in listing("alice"))

    await eventually(held, "alice's mail held as a stranger's")
    for p in listing("alice"):
        alice.submissions.store.cancel(p.submission_id)

    # bob, a contact, gets through
    await send(bob, "bob", carol, "carol", "from a contact")
    await eventually(lambda: "from a contact" in subjects(carol, "carol"), "bob's mail at carol")
    assert "refused as a stranger" not in subjects(carol, "carol")
    assert "sealed against the closed mailbox" not in subjects(carol, "carol")
