"""Latency and throughput over real onion services, on a private Tor network on 127.0.0.1.

The floor is a raw onion echo: 64 bytes through an established onion circuit and back, measured
in the same run on the same network.  A second floor carries a delivery's bytes: a 16 KiB
upload (the size of every short envelope, ``padding.FLOOR``) answered with 64 bytes, on an
established stream; on the test network the circuit moves 16 KiB far slower than 64 B, so a
delivery can never be faster than this.  Against them:

* the node API round trip over a fresh stream (what every delivery and key fetch pays);
* end to end, from a mail client's submission to the message being filed on the recipient's
  device, cold (first contact: keys fetched, circuits built) and warm;
* the drain rate when a queue of mail meets a recipient whose inbox comes back.

A private network has no real latency between relays, so these figures show onionpost's own
costs on top of tor's, not what the live Tor network adds (seconds per new circuit there).
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

from bench.harness import Context, Stats, fmt_time
from onionpost.core.crypto.padding import FLOOR
from onionpost.net.client import InboxClient

try:
    from onionpost.net.pool import ConnectionPool
except ImportError:  # the same bench on code from before the pool (for before/after runs)
    ConnectionPool = None  # type: ignore[assignment,misc]
from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import Config, load
from onionpost.net.tor.runtime import TorRuntime
from onionpost.net.tor.socks import TorDialer
from onionpost.testing.mailstore import filed, memory_mailbox
from onionpost.testing.tornet import TorNetwork


def run(ctx: Context) -> None:
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-tor-") as tmp:
        root = Path(tmp)
        net = TorNetwork(root / "net")
        started = time.monotonic()
        net.start(150)
        try:
            ctx.note(f"private Tor network ready in {time.monotonic() - started:.1f} s")
            asyncio.run(measure(ctx, net, root))
        finally:
            net.stop()


async def measure(ctx: Context, net: TorNetwork, root: Path) -> None:
    """All measurements on an already running network (the tor tests' smoke test uses this)."""
    echo, upload = await _echo_floor(ctx, net, root)
    alice = _node(root, "alice", net)
    bob = _node(root, "bob", net)
    await alice.start(wait_for_tor=True)
    await bob.start(wait_for_tor=True)
    try:
        await _api_round_trip(ctx, alice, bob, echo)
        await _end_to_end(ctx, alice, bob, echo, upload)
        await bob.stop()
        await _drain(ctx, alice, bob, root, net)
    finally:
        await alice.stop()
        await bob.stop()


# --- the floor: raw echo through an onion ----------------------------------------------------


async def _echo_floor(ctx: Context, net: TorNetwork, root: Path) -> tuple[Stats, Stats]:
    ctx.heading("onion round trip: 64 bytes through an established onion circuit (the floor)")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            if await reader.readexactly(1) == b"u":  # uploads: 4-byte length, data, 64 B answer
                while size := int.from_bytes(await reader.readexactly(4), "big"):
                    await reader.readexactly(size)
                    writer.write(b"a" * 64)
                    await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    service = await TorRuntime.start(net.tor_config(), root / "echo-service", clock=SystemClock())
    client = await TorRuntime.start(net.tor_config(), root / "echo-client", clock=SystemClock())
    try:
        onion = await service.publish_service(b"\x07" * 32, "127.0.0.1", port)
        dialer = TorDialer(client)
        t0 = time.perf_counter()
        reader, writer = await dialer.open(onion, 80, isolation="bench", timeout=60)
        first = time.perf_counter() - t0
        writer.write(b"e")
        rounds = 30 if ctx.quick else 200
        samples = []
        for _ in range(rounds):
            t = time.perf_counter()
            writer.write(b"x" * 64)
            await writer.drain()
            await reader.readexactly(64)
            samples.append(time.perf_counter() - t)
        writer.close()
        reader, writer = await dialer.open(onion, 80, isolation="bench", timeout=60)
        writer.write(b"u")
        uploads = []
        for _ in range(10 if ctx.quick else 40):
            t = time.perf_counter()
            writer.write(FLOOR.to_bytes(4, "big") + b"x" * FLOOR)
            await writer.drain()
            await reader.readexactly(64)
            uploads.append(time.perf_counter() - t)
        writer.write(b"\0\0\0\0")
        writer.close()
        streams = []
        for _ in range(10 if ctx.quick else 40):
            t = time.perf_counter()
            _, w = await dialer.open(onion, 80, isolation="bench", timeout=60)
            streams.append(time.perf_counter() - t)
            w.close()
        floor = Stats("raw onion echo, 64 B", tuple(samples))
        ctx.figure("first connect (circuit + rendezvous)", fmt_time(first))
        ctx.figure("echo round trip p50 / p95", f"{fmt_time(floor.p50)} / {fmt_time(floor.p95)}")
        new_stream = Stats("new stream on the circuit", tuple(streams))
        ctx.compare(new_stream, floor)
        upload = Stats("16 KiB up + 64 B back", tuple(uploads))
        ctx.compare(upload, floor, extra="a short envelope's bytes: a delivery's floor")
        return floor, upload
    finally:
        await client.stop()
        await service.stop()
        server.close()


# --- the node API -----------------------------------------------------------------------------


def _node(root: Path, user: str, net: TorNetwork) -> Node:
    home = root / user
    if not (home / "inbox").exists():
        initialize(load(home), local=user, device_name="laptop", now=int(time.time()))
    cfg: Config = load(
        home,
        {
            "tor": {"extra_torrc": net.client_torrc_lines(), "bootstrap_timeout": 90},
            "inbox": {
                "pow_bits": 8,
                "longpoll_seconds": 5.0,
                "rate_per_mailbox_per_hour": 1_000_000,
                "rate_per_source_per_hour": 1_000_000,
                "rate_strangers_per_mailbox_per_hour": 1_000_000,
                "rate_strangers_per_hour": 1_000_000,
            },
            "delivery": {"retry_min_seconds": 1, "retry_max_seconds": 5, "concurrency": 16},
        },
    )
    return Node(cfg, clock=SystemClock(), extensions=(memory_mailbox,))


async def _api_round_trip(ctx: Context, alice: Node, bob: Node, floor: Stats) -> None:
    ctx.heading("node API over an onion: GET /v1/health, a fresh stream each / one kept alive")
    assert alice.tor is not None
    onion = bob.devices["bob"].address.onion
    client = InboxClient(TorDialer(alice.tor), onion, isolation="bench-api", timeout=60)
    await client.health()  # circuit built
    samples = []
    for _ in range(10 if ctx.quick else 60):
        t = time.perf_counter()
        await client.health()
        samples.append(time.perf_counter() - t)
    ctx.distribution(Stats("API round trip", tuple(samples)), floor)
    if ConnectionPool is None:  # the bench run on code from before the pool
        return
    pool = ConnectionPool(TorDialer(alice.tor))
    kept = InboxClient(TorDialer(alice.tor), onion, isolation="bench-api", timeout=60, pool=pool)
    await kept.health()
    samples = []
    for _ in range(10 if ctx.quick else 60):
        t = time.perf_counter()
        await kept.health()
        samples.append(time.perf_counter() - t)
    await pool.close()
    ctx.distribution(Stats("API round trip, kept alive", tuple(samples)), floor)


# --- end to end -------------------------------------------------------------------------------


def _mail(frm: Node, user: str, to: str, subject: str) -> bytes:
    m = EmailMessage()
    m["From"] = str(frm.devices[user].address)
    m["To"] = to
    m["Subject"] = subject
    m.set_content("x" * 4000)
    return m.as_bytes()


def _filed(node: Node, user: str) -> int:
    """Messages the node's filer handed to its mailbox (a memory sink: the tor bench
    measures the network, not Dovecot; the gateway bench measures Dovecot)."""
    return len(filed(node, user))


async def _until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark's mail did not arrive in time")
        await asyncio.sleep(0.01)


async def _one(frm: Node, fuser: str, to: Node, tuser: str, subject: str) -> float:
    assert frm.submissions is not None
    before = _filed(to, tuser)
    dest = to.devices[tuser].address
    t = time.perf_counter()
    frm.submissions.submit(fuser, [dest], _mail(frm, fuser, str(dest), subject))
    await _until(lambda: _filed(to, tuser) > before, 120)
    return time.perf_counter() - t


async def _end_to_end(ctx: Context, alice: Node, bob: Node, floor: Stats, upload: Stats) -> None:
    ctx.heading("end to end, 4 KiB: submitted at alice's gateway -> filed on bob's device")
    cold = await _one(alice, "alice", bob, "bob", "cold")
    await _one(bob, "bob", alice, "alice", "token for alice")  # alice gets bob's contact token
    pool = getattr(alice, "pool", None)
    warm, fresh = [], []
    for i in range(5 if ctx.quick else 30):
        warm.append(await _one(alice, "alice", bob, "bob", f"warm {i}"))
        if pool is not None:  # interleaved, so both see the same load on a shared machine
            with _without_pool(alice):
                fresh.append(await _one(alice, "alice", bob, "bob", f"fresh {i}"))
    ctx.figure("cold (first contact)", fmt_time(cold), extra="keys fetched, circuits built")
    ctx.distribution(Stats("warm", tuple(warm)), floor)
    ctx.compare(Stats("warm", tuple(warm)), upload)
    if pool is None:
        return
    ctx.distribution(
        Stats("warm, a new stream per request", tuple(fresh)),
        floor,
        extra="no kept-alive streams (as before them), interleaved with the row above",
    )
    # The kept stream expires after pool.idle_timeout; the keys are still fresh, so sealing
    # the next message opens the stream again (pre-warming) while it seals.
    idle = []
    for i in range(1 if ctx.quick else 3):
        await asyncio.sleep(pool.idle_timeout + 1)
        idle.append(await _one(alice, "alice", bob, "bob", f"after idle {i}"))
    ctx.distribution(
        Stats(f"warm after {pool.idle_timeout + 1:.0f} s idle", tuple(idle)),
        floor,
        extra="kept stream expired, reopened while sealing",
    )
    s = pool.stats
    ctx.figure(
        "alice's kept-alive streams",
        f"{s.opened} opened",
        extra=f"{s.reused} reuses, {s.warmed} pre-warmed, {s.expired} expired idle",
    )


@contextlib.contextmanager
def _without_pool(node: Node) -> Iterator[None]:
    """The node's deliveries and key fetches without kept-alive streams, for comparison."""
    assert node.worker is not None
    pool = node.worker.pool
    node.worker.pool = None
    for device in node.devices.values():
        device.directory.pool = None
    try:
        yield
    finally:
        node.worker.pool = pool
        for device in node.devices.values():
            device.directory.pool = pool


# --- draining a queue -------------------------------------------------------------------------


async def _drain(ctx: Context, alice: Node, bob_was: Node, root: Path, net: TorNetwork) -> None:
    count = 100 if ctx.quick else 10_000
    ctx.heading(f"drain: {count} messages queued while bob's inbox was down, then bob comes back")
    assert alice.submissions is not None and alice.inbox is not None
    dest = bob_was.devices["bob"].address
    t = time.perf_counter()
    for i in range(count):
        alice.submissions.submit("alice", [dest], _mail(alice, "alice", str(dest), f"q{i}"))
    await alice.submissions.process_due()
    sealed = time.perf_counter() - t
    ctx.figure(
        "queued and sealed", f"{count / sealed:,.0f} msg/s", extra=f"{count} in {sealed:.1f} s"
    )
    bob = _node(root, "bob", net)
    await bob.start(wait_for_tor=True)
    try:
        before = _filed(bob, "bob")
        t = time.perf_counter()
        alice.inbox.outbox.retry_now(alice.clock.now())
        alice.wake()
        await _until(lambda: not alice.inbox.outbox.rows() if alice.inbox else True, 900)
        delivered = time.perf_counter() - t
        await _until(lambda: _filed(bob, "bob") - before >= count, 900)
        filed = time.perf_counter() - t
        ctx.figure(
            "delivered over tor",
            f"{count / delivered:,.1f} msg/s",
            extra=f"all {count} in {delivered:.1f} s",
        )
        ctx.figure(
            "filed on bob's device",
            f"{count / filed:,.1f} msg/s",
            extra=f"all {count} in {filed:.1f} s",
        )
    finally:
        await bob.stop()
