"""A device's requests to its own inbox on kept-alive connections (issue 12: ~5 requests per
delivered message, each a new TCP connection before).

The device's session goes through the node's :class:`~onionpost.net.pool.ConnectionPool`
for the requests that are safe to send twice (pending, fetch, acknowledge, hand-over), and on
a connection of its own for the rest (login).  Two inboxes on loopback; each person's device
reaches its inbox through a TCP proxy that can cut the kept connections (see
``test_connection_reuse.py``): a connection the inbox closed, or one that lost an answer after
the inbox acted on the request, is replaced by a fresh one, and nothing is lost or doubled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from onionpost.device.submission import HAND_OVERS_AT_ONCE
from onionpost.net.pool import ConnectionPool
from onionpost.net.transport import DirectDialer, Streams
from onionpost.testing.harness import DeviceNode, InboxNode, Loopback, compose, subjects

from .test_connection_reuse import CuttingProxy


class CountingDirect(DirectDialer):
    """A DirectDialer that counts every connection it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.opened = 0

    async def open(self, onion: str, port: int, *, isolation: str, timeout: float) -> Streams:
        self.opened += 1
        return await super().open(onion, port, isolation=isolation, timeout=timeout)


class Person:
    """A device with a node's pool, reaching its inbox through its own dialer and a proxy."""

    def __init__(self, world: Loopback, inbox: InboxNode, local: str) -> None:
        self.inbox = inbox
        self.dialer = CountingDirect()
        self.pool = ConnectionPool(self.dialer)
        self.node = DeviceNode(
            world.root,
            local,
            inbox.provision(local),
            world.clock,
            self.dialer,
            connections=self.pool,
        )
        world.devices.append(self.node)
        self.proxy: CuttingProxy | None = None

    async def start(self, world: Loopback) -> None:
        """Route the device's own inbox through a proxy, and other inboxes directly."""
        self.dialer.routes.update(world.dialer.routes)
        host, port = world.dialer.routes[self.inbox.onion].rsplit(":", 1)
        self.proxy = CuttingProxy(int(port))
        self.dialer.add(self.inbox.onion, host, await self.proxy.start())

    async def stop(self) -> None:
        await self.pool.close()
        if self.proxy is not None:
            await self.proxy.stop()


class World(Loopback):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.a = self.add_inbox("inbox-a")
        self.b = self.add_inbox("inbox-b")
        self.alice = Person(self, self.a, "alice")
        self.bob = Person(self, self.b, "bob")

    async def hand_over(self, subjects_: list[str]) -> None:
        alice, bob = self.alice.node, self.bob.node
        for subject in subjects_:
            alice.submissions.submit(alice.user, [bob.address], compose(alice, bob, subject))
        await alice.submissions.process_due()
        await self.a.worker.run_due()

    def pending_at_b(self) -> int:
        return self.b.inbox.store.spooled(self.bob.node.device.account.mailbox_id)[0]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        await w.alice.start(w)
        await w.bob.start(w)
        try:
            yield w
        finally:
            await w.alice.stop()
            await w.bob.stop()


async def test_a_devices_requests_to_its_inbox_share_a_kept_connection(world: World) -> None:
    bob = world.bob
    await world.hand_over(["first"])  # the first contact (proof of work)
    assert await bob.node.device.sync() == 1
    for round_ in range(3):
        await world.hand_over([f"mail {round_}.{i}" for i in range(4)])
        assert await bob.node.device.sync() == 4
    assert sorted(subjects(bob.node)) == sorted(
        ["first", *(f"mail {r}.{i}" for r in range(3) for i in range(4))]
    )
    assert world.pending_at_b() == 0
    # four syncs of two requests each (pending mail, which carries the batch, and
    # acknowledge) on one kept connection; the login's two requests (challenge, login) had
    # connections of their own
    assert bob.pool.stats.opened == 1
    assert bob.pool.stats.reused >= 7
    assert bob.dialer.opened - bob.pool.stats.opened == 2
    # alice's hand-overs went over kept connections too: as many as she hands over at once
    # at most, reused by the later rounds (and one more: her key fetch from B)
    stats = world.alice.pool.stats
    assert 1 <= stats.opened_to[world.a.onion] <= HAND_OVERS_AT_ONCE
    assert stats.opened_to[world.b.onion] == 1 and stats.reused >= 3


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_cut_kept_connection_loses_and_doubles_nothing(world: World, when: str) -> None:
    """``before``: the inbox closed the idle connection, the request never reached it;
    ``after``: the inbox acted on the request (the pending list read, the acknowledgement
    made, the hand-over queued) but its answer was lost.  Each is sent again on a fresh
    connection, once."""
    alice, bob = world.alice, world.bob
    await world.hand_over(["first"])
    assert await bob.node.device.sync() == 1
    assert bob.proxy is not None and alice.proxy is not None

    # the hand-over: the inbox answers a repeated submission with the row it queued
    alice.proxy.cut(when)
    await world.hand_over(["handed twice?"])
    rows = world.a.inbox.outbox.rows(states=("queued", "delivered", "deferred", "bounced"))
    assert len(rows) == 2  # "first" and this one: the repeated hand-over queued nothing new
    assert alice.pool.stats.discarded >= 1  # the cut connection

    # the pending list, then the acknowledgement
    bob.proxy.cut(when)
    assert await bob.node.device.sync() == 1
    ack = bob.node.device.session.acknowledge

    async def cut_then_ack(ids: list[int]) -> int:
        assert bob.proxy is not None
        bob.proxy.cut(when)
        return await ack(ids)

    bob.node.device.session.acknowledge = cut_then_ack  # type: ignore[method-assign]
    await world.hand_over(["acknowledged twice?", "and another"])
    assert await bob.node.device.sync() == 2
    assert world.pending_at_b() == 0
    assert sorted(subjects(bob.node)) == sorted(
        ["first", "handed twice?", "acknowledged twice?", "and another"]
    )
    assert bob.pool.stats.discarded >= 2  # the cut connections
    assert await bob.node.device.sync() == 0  # nothing left, nothing filed again
    assert len(subjects(bob.node)) == 4


async def test_a_long_poll_on_a_kept_connection_is_not_taken_for_dead(world: World) -> None:
    """A reused connection whose answer has not begun within ``reused_answer_timeout`` is
    given up and the request sent again; a long poll's wait is added to that allowance, so a
    quiet inbox holding the pending list back is not mistaken for a dead connection."""
    bob = world.bob
    await world.hand_over(["first"])
    assert await bob.node.device.sync() == 1  # the connection is kept now
    bob.node.device.client.reused_answer_timeout = 5.0
    assert await bob.node.device.session.pending(wait=7.0) == []  # nothing comes: 7 s
    assert bob.pool.stats.discarded == 0
    assert bob.pool.stats.opened == 1
