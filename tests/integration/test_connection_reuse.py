"""Kept-alive connections between inboxes (onionpost/net/pool.py), over loopback: reuse
happens, destinations never share a connection, and a pooled connection that dies is replaced
by a fresh one without losing or duplicating a message.

The dying connection is made by a small TCP proxy between the client and the inbox that cuts
the connections open at the moment it is told to, either before the next request reaches the
inbox (the peer closed an idle connection) or after the inbox stored it but before its answer
gets back (the answer is lost): both are what a keep-alive connection over tor can meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from pathlib import Path

import pytest

from onionpost.base.clock import SystemClock
from onionpost.core.crypto.bundle import KeyBundle, verify_bundle
from onionpost.core.errors import PeerUnreachable
from onionpost.inbox import delivery as delivery_module
from onionpost.net.client import InboxClient
from onionpost.net.pool import ConnectionPool, peer_isolation
from onionpost.net.transport import DirectDialer, Streams
from onionpost.store.outbox import OutboxRow
from onionpost.testing.harness import InboxNode

from .test_inbox_api import _sealed, _session


class CountingDialer:
    """A DirectDialer that counts the connections it opens per destination."""

    def __init__(self, inner: DirectDialer) -> None:
        self.inner = inner
        self.opened: dict[str, int] = {}

    async def open(self, onion: str, port: int, *, isolation: str, timeout: float) -> Streams:
        self.opened[onion] = self.opened.get(onion, 0) + 1
        return await self.inner.open(onion, port, isolation=isolation, timeout=timeout)


class CuttingProxy:
    """Relays TCP to ``target``; :meth:`cut` dooms every connection open right now."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._doomed: dict[asyncio.StreamWriter, str] = {}
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._open):
            w.close()

    def cut(self, when: str) -> None:
        """``before``: the next request on an open connection is dropped unread and the
        connection closed; ``after``: it reaches the inbox, whose answer is dropped;
        ``stall``: everything sent on it from now on vanishes, the connection stays open."""
        for w in self._open:
            self._doomed[w] = when

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self._open.add(cw)  # before any await: cut() must see every accepted connection
        ur, uw = await asyncio.open_connection("127.0.0.1", self.target)
        answer_lost = asyncio.Event()

        def close() -> None:
            cw.close()
            uw.close()

        async def up() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await cr.read(65536):
                    when = self._doomed.get(cw)
                    if when == "stall":  # a circuit gone silent: bytes go nowhere
                        continue
                    self._doomed.pop(cw, None)
                    if when == "before":
                        close()
                        return
                    if when == "after":
                        answer_lost.set()
                    uw.write(data)
                    await uw.drain()
            uw.close()

        async def down() -> None:
            with contextlib.suppress(ConnectionError):
                while data := await ur.read(65536):
                    if answer_lost.is_set():
                        close()
                        return
                    cw.write(data)
                    await cw.drain()
            cw.close()

        try:
            await asyncio.gather(up(), down())
        finally:
            self._open.discard(cw)
            self._doomed.pop(cw, None)


@pytest.fixture
async def world(tmp_path: Path):
    clock = SystemClock()
    dialer = DirectDialer()
    node = InboxNode(tmp_path, "b", clock, dialer)
    await node.start(worker=False)
    bob = node.provision("bob", "laptop")
    alice_node = InboxNode(tmp_path, "a", clock, dialer)
    alice = alice_node.provision("alice")
    proxy = CuttingProxy(node.server.port)
    dialer.add(node.onion, "127.0.0.1", await proxy.start())
    try:
        yield node, bob, alice, dialer, proxy
    finally:
        await proxy.stop()
        await node.stop()
        node.close()
        alice_node.close()


def _pooled(node: InboxNode, dialer: CountingDialer | DirectDialer, pool: ConnectionPool):
    return InboxClient(
        dialer, node.onion, isolation=peer_isolation(node.onion), timeout=20, pool=pool
    )


async def test_a_key_fetch_and_deliveries_to_one_inbox_share_one_connection(world) -> None:
    node, bob, alice, direct, _ = world
    dialer = CountingDialer(direct)
    pool = ConnectionPool(dialer)
    client = _pooled(node, dialer, pool)
    raw = await client.bundle("bob")
    verify_bundle(
        KeyBundle.parse(raw), onion_pk=node.secrets.onion_pk, local="bob", now=int(time.time())
    )
    receipts = []
    for i in range(3):
        l1 = await _sealed(node, bob, alice, direct, body=f"Subject: {i}\r\n\r\nhi\r\n".encode())
        receipts.append(await client.deliver(l1))
    assert dialer.opened == {node.onion: 1}
    assert pool.stats.opened == 1 and pool.stats.reused == 3
    assert not any(r.duplicate for r in receipts)
    assert len(await _session(node, bob, direct).pending()) == 3
    assert pool.idle_count(node.onion) == 1
    await pool.close()
    assert pool.idle_count() == 0


async def test_concurrent_deliveries_open_more_connections_and_keep_a_bounded_number(
    world,
) -> None:
    node, bob, alice, direct, _ = world
    pool = ConnectionPool(direct, max_idle=2)
    client = _pooled(node, direct, pool)
    envelopes = [
        await _sealed(node, bob, alice, direct, body=f"Subject: {i}\r\n\r\nhi\r\n".encode())
        for i in range(5)
    ]
    await asyncio.gather(*(client.deliver(l1) for l1 in envelopes))
    assert pool.idle_count(node.onion) <= 2
    opened = pool.stats.opened
    await asyncio.gather(*(client.deliver(l1) for l1 in envelopes[:2]))
    assert pool.stats.opened == opened  # the two kept connections carried these
    assert len(await _session(node, bob, direct).pending()) == 5
    await pool.close()


async def test_connections_are_never_shared_across_destinations(world, tmp_path: Path) -> None:
    node, _, _, direct, _ = world
    other = InboxNode(tmp_path, "c", SystemClock(), direct)
    await other.start(worker=False)
    try:
        dialer = CountingDialer(direct)
        pool = ConnectionPool(dialer)
        for _ in range(2):
            assert await _pooled(node, dialer, pool).health()
            assert await _pooled(other, dialer, pool).health()
            # the same destination in another role: a circuit (and connection) of its own
            assert await InboxClient(
                dialer, node.onion, isolation="probe", timeout=20, pool=pool
            ).health()
        assert dialer.opened == {node.onion: 2, other.onion: 1}
        assert pool.idle_count(node.onion) == 2 and pool.idle_count(other.onion) == 1
        await pool.close()
    finally:
        await other.stop()
        other.close()


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_dead_pooled_connection_is_retried_on_a_fresh_one(world, when: str) -> None:
    """The request after the cut goes again on a new connection: the message is stored
    exactly once (``after``: the inbox stored it, its answer was lost, and the repeat is
    recognised as a duplicate with the same receipt)."""
    node, bob, alice, direct, proxy = world
    pool = ConnectionPool(direct)
    client = _pooled(node, direct, pool)
    first = await client.deliver(await _sealed(node, bob, alice, direct))
    assert pool.idle_count(node.onion) == 1
    proxy.cut(when)
    l1 = await _sealed(node, bob, alice, direct, body=b"Subject: second\r\n\r\nhi\r\n")
    second = await client.deliver(l1)
    assert second.receipt != first.receipt
    assert second.duplicate is (when == "after")
    assert pool.stats.discarded == 1 and pool.stats.opened == 2
    assert len(await _session(node, bob, direct).pending()) == 2
    await pool.close()


async def test_a_fresh_connection_that_dies_is_not_retried(world) -> None:
    """Only a *reused* connection is tried again: a new one failing is a real failure,
    reported as before (the outbox retries it later)."""
    node, bob, alice, direct, proxy = world
    await proxy.stop()  # nothing listens on the proxy's port any more
    pool = ConnectionPool(direct)
    with pytest.raises(PeerUnreachable):
        await _pooled(node, direct, pool).deliver(await _sealed_direct(node, bob, alice))
    assert pool.stats.opened == 0 and pool.idle_count() == 0


async def _sealed_direct(node: InboxNode, bob, alice):
    dialer = DirectDialer({node.onion: f"127.0.0.1:{node.server.port}"})
    return await _sealed(node, bob, alice, dialer)


async def test_idle_connections_expire_and_a_peer_closed_one_is_not_used(world) -> None:
    node, _, _, direct, proxy = world
    pool = ConnectionPool(direct, idle_timeout=0.05)
    assert await _pooled(node, direct, pool).health()
    deadline = time.monotonic() + 60
    while pool.idle_count() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert pool.idle_count() == 0 and pool.stats.expired == 1
    # A connection the peer closed while idle is seen as closed and replaced.
    pool = ConnectionPool(direct)
    assert await _pooled(node, direct, pool).health()
    proxy.cut("before")
    for w in list(proxy._open):
        w.close()
    await asyncio.sleep(0)
    assert await _pooled(node, direct, pool).health()
    assert pool.stats.opened == 2
    await pool.close()


async def _queue_to(sender: InboxNode, world, n: int, key: str) -> None:
    """Queue ``n`` messages from alice to bob in ``sender``'s outbox, for its worker."""
    node, bob, alice, direct, _ = world
    now = sender.clock.now()
    for i in range(n):
        l1 = await _sealed(node, bob, alice, direct, body=f"Subject: {i}\r\n\r\nx\r\n".encode())
        sender.inbox.outbox.enqueue(
            mailbox_id=alice.mailbox_id,
            device_id=alice.device.device_id,
            onion=node.onion,
            envelope=l1,
            submission_key=f"{key}-{i}",
            now=now,
            expires_at=now + 3600,
        )


async def test_the_outbox_worker_reuses_one_connection_for_a_burst(world) -> None:
    """The real delivery path: four queued rows to one inbox, delivered one at a time by
    another inbox's outbox worker, travel on one connection."""
    node, bob, _, direct, _ = world
    dialer = CountingDialer(direct)
    sender = InboxNode(node.dir.parent, "a2", SystemClock(), direct)
    pool = ConnectionPool(dialer)
    sender.worker.dialer = dialer
    sender.worker.pool = pool
    sender.worker._slots = asyncio.Semaphore(1)  # one at a time: each finds the kept one
    delivered: list[OutboxRow] = []
    sender.worker.on_finished.append(delivered.append)
    try:
        await _queue_to(sender, world, 4, "burst")
        assert await sender.worker.run_due() == 4
        assert [r.state for r in delivered] == ["delivered"] * 4
        assert dialer.opened == {node.onion: 1}
        assert len(await _session(node, bob, direct).pending()) == 4
    finally:
        await pool.close()
        sender.close()


async def test_a_prewarmed_connection_carries_the_next_request(world) -> None:
    """warm() opens the connection in the background; a request that comes meanwhile waits
    for it instead of opening a second one, and a later warm() with one idle does nothing."""
    node, bob, alice, direct, proxy = world
    dialer = CountingDialer(direct)
    pool = ConnectionPool(dialer)
    pool.warm(node.onion, 80, isolation=peer_isolation(node.onion), timeout=20)
    l1 = await _sealed(node, bob, alice, direct)
    assert not (await _pooled(node, dialer, pool).deliver(l1)).duplicate
    assert dialer.opened == {node.onion: 1} and pool.stats.warmed == 1
    pool.warm(node.onion, 80, isolation=peer_isolation(node.onion), timeout=20)
    assert dialer.opened == {node.onion: 1}  # one is idle: nothing to warm
    # a pre-warmed connection the peer drops as it is used is replaced like a kept one
    pool2 = ConnectionPool(direct)
    pool2.warm(node.onion, 80, isolation=peer_isolation(node.onion), timeout=20)
    deadline = time.monotonic() + 60
    while not pool2.idle_count() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    proxy.cut("before")
    l1 = await _sealed(node, bob, alice, direct, body=b"Subject: warm\r\n\r\nhi\r\n")
    assert not (await _pooled(node, direct, pool2).deliver(l1)).duplicate
    assert pool2.stats.discarded == 1 and pool2.stats.opened == 2
    assert len(await _session(node, bob, direct).pending()) == 2
    await pool.close()
    await pool2.close()


async def test_a_kept_connection_gone_silent_is_given_up_and_the_request_sent_again(
    world,
) -> None:
    """A reused connection that swallows the request (its circuit died without tor closing
    the stream) is taken for dead when no answer byte comes in time, not after the whole
    request timeout; the request goes again on a fresh connection."""
    node, bob, alice, direct, proxy = world
    pool = ConnectionPool(direct)
    client = _pooled(node, direct, pool)
    client.reused_answer_timeout = 0.5
    await client.deliver(await _sealed(node, bob, alice, direct))
    proxy.cut("stall")
    l1 = await _sealed(node, bob, alice, direct, body=b"Subject: silent\r\n\r\nhi\r\n")
    assert not (await client.deliver(l1)).duplicate
    assert pool.stats.discarded == 1 and pool.stats.opened == 2
    assert len(await _session(node, bob, direct).pending()) == 2
    await pool.close()


async def test_a_request_waiting_on_a_failed_warm_up_gets_its_failure(world) -> None:
    """A delivery that waited for a pre-warm to a dead inbox fails with the warm-up's error
    instead of dialing a second time (two connect timeouts per delivery to a peer that is
    down)."""
    node, bob, alice, direct, proxy = world
    l1 = await _sealed_direct(node, bob, alice)
    await proxy.stop()  # nothing listens on the proxy's port any more
    dialer = CountingDialer(direct)
    pool = ConnectionPool(dialer)
    pool.warm(node.onion, 80, isolation=peer_isolation(node.onion), timeout=20)
    with pytest.raises(PeerUnreachable):
        await _pooled(node, dialer, pool).deliver(l1)
    assert dialer.opened == {node.onion: 1}
    await pool.close()


class WriteCountingDialer:
    """A DirectDialer whose connections record each ``write`` the client makes."""

    def __init__(self, inner: DirectDialer) -> None:
        self.inner = inner
        self.writes: list[int] = []

    async def open(self, onion: str, port: int, *, isolation: str, timeout: float) -> Streams:
        reader, writer = await self.inner.open(onion, port, isolation=isolation, timeout=timeout)
        real = writer.write

        def write(data: bytes | bytearray | memoryview) -> None:
            self.writes.append(len(data))
            real(data)

        writer.write = write  # type: ignore[method-assign]
        return reader, writer


async def test_a_request_and_its_body_leave_in_one_write(world) -> None:
    """Over tor, the second of two writes can wait ~40 ms behind the first: a request with a
    small body (a device's JSON calls, a delivery from memory) is one write, and a streamed
    one sends its head with the first piece."""
    node, bob, alice, dialer, _ = world
    counting = WriteCountingDialer(dialer)
    client = InboxClient(counting, node.onion, isolation="test", timeout=20)
    l1 = await _sealed(node, bob, alice, dialer)
    await client.deliver(l1)
    assert counting.writes == [pytest.approx(len(l1), abs=400)]
    counting.writes.clear()
    await client.deliver((io.BytesIO(l1), len(l1)))
    assert len(counting.writes) == 1 and counting.writes[0] > len(l1)


async def test_a_burst_over_several_passes_keeps_its_connections(world, monkeypatch) -> None:
    """The worker delivers a long queue in passes, ``concurrency`` at a time; with the pool
    keeping as many as that (as the node sets it up), later passes open no new stream."""
    node, bob, _, direct, _ = world
    monkeypatch.setattr(delivery_module, "BATCH", 4)  # three passes for twelve rows
    dialer = CountingDialer(direct)
    sender = InboxNode(node.dir.parent, "a3", SystemClock(), direct)
    pool = ConnectionPool(dialer, max_idle=4)
    sender.worker.dialer = dialer
    sender.worker.pool = pool
    sender.worker._slots = asyncio.Semaphore(4)
    try:
        await _queue_to(sender, world, 12, "passes")
        assert await sender.worker.run_due() == 12
        assert dialer.opened[node.onion] <= 4
        assert len(await _session(node, bob, direct).pending()) == 12
    finally:
        await pool.close()
        sender.close()
