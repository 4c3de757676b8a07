"""Complete nodes on the private Tor network, for the tests here that run several.

Every such test built its nodes the same way (a home initialised for one user, tor joined to
the test network, a quick retry policy, the mailbox in memory), started them, and stopped
them in a ``finally``: :func:`running` is that, once.  A test that restarts a node puts the new
one in the dict it was given, so what it ends with is what is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path

from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import Config, load
from onionpost.testing.mailstore import memory_mailbox
from onionpost.testing.tornet import TorNetwork


def make_config(root: Path, user: str, net: TorNetwork) -> Config:
    home = root / user
    overrides = {
        "tor": {"extra_torrc": net.client_torrc_lines(), "bootstrap_timeout": 90},
        "inbox": {"pow_bits": 8, "longpoll_seconds": 5.0},
        "delivery": {"retry_min_seconds": 1, "retry_max_seconds": 5},
    }
    if not (home / "inbox").exists():
        initialize(load(home), local=user, device_name="laptop", now=int(time.time()))
    return load(home, overrides)


def tor_node(root: Path, user: str, net: TorNetwork) -> Node:
    """A node (not started) for ``user`` in ``root/user``, made on first use, kept after."""
    return Node(make_config(root, user, net), clock=SystemClock(), extensions=(memory_mailbox,))


@contextlib.asynccontextmanager
async def running(
    root: Path, net: TorNetwork, *users: str, together: bool = False
) -> AsyncIterator[dict[str, Node]]:
    """One started node per user (in turn, or ``together``), stopped on the way out."""
    nodes = {user: tor_node(root, user, net) for user in users}
    try:
        if together:
            await asyncio.gather(*(n.start(wait_for_tor=True) for n in nodes.values()))
        else:
            for node in nodes.values():
                await node.start(wait_for_tor=True)
        yield nodes
    finally:
        for node in nodes.values():
            await node.stop()


def mail(frm: str, to: str, subject: str) -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = frm, to, subject
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@tor.test>"
    m.set_content(f"{subject} over onion services")
    return m.as_bytes()


async def eventually(check: Callable[[], object], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


async def send(node: Node, user: str, to: Node, to_user: str, subject: str) -> None:
    assert node.submissions is not None
    frm, dest = node.devices[user].address, to.devices[to_user].address
    node.submissions.submit(user, [dest], mail(str(frm), str(dest), subject))
