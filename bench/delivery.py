"""Loopback delivery: submit -> seal -> outbox -> node API -> inbox -> filed on 3 devices.

Two real inboxes (SQLite files, the node API on 127.0.0.1, their outbox workers) and real
devices with their own device.db, built with the integration harness
(:mod:`onionpost.testing.harness`).  alice (one device, behind inbox A) mails bob, who has
three devices behind inbox B.  Every message is 4 KiB and goes the way a mail client's does:
:meth:`~onionpost.device.submission.Submissions.submit_async` from ten clients at once, as the
SMTP gateway submits (durable, Sent copy filed; committed in the group commit's thread, the
submissions that arrive meanwhile sharing the next commit), the sealing loop
(the node's "seal" job, woken by the submission: fetch bob's bundle, seal, hand to inbox
A), A's outbox worker (the node's "deliver" job, woken by the hand-over), ``POST
/v1/deliver`` to B, and each of bob's devices' background long-poll sync (``Device.start``),
which fetches, opens, verifies and files.  alice's side also checks her outcomes every 60 s,
as a node's "outcomes" job does.  A message is delivered when the last of bob's three
devices has filed it.

The reference is the crypto alone, on the same bytes in the same process: seal (L3 sign, L2
with three device stanzas, L1 to B's server key) plus one L1 open and three L2 opens, no I/O.
Everything else the pipeline does - SQLite commits with ``synchronous=FULL``, one HTTP
exchange per request, key bundle fetch and verification, normalising and filing - is the
ratio.  Commits per message are counted (SQLite trace callbacks) and printed next to one
durable commit on the same disk.

The same measurement is then repeated with a full :class:`onionpost.app.node.Node` as the sender
(tor off, no gateway extensions): there, sealing and delivery are the node's scheduler jobs
("seal", "deliver"), woken by each submission, as in production.

alice and bob exchange a first message before the measurement, so alice holds a contact
token for bob (no proof of work: the steady state between contacts).  Inbox B's hourly rate
limits are raised for the run: the defaults (600 deliveries per mailbox per hour) would
otherwise be what is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

from bench.harness import (
    Context,
    Stats,
    fmt_bytes,
    fmt_time,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from onionpost.base.clock import Clock, SystemClock
from onionpost.core.account import Account, add_device, create_identity
from onionpost.core.address import Address
from onionpost.core.crypto.envelope import (
    StanzaTarget,
    open_inner,
    open_outer,
    seal_inner,
    seal_outer,
)
from onionpost.core.crypto.keys import ServerSecrets
from onionpost.core.crypto.primitives import x25519_public
from onionpost.core.crypto.sender import EXT_SENDER_KEYS
from onionpost.device.session import Device
from onionpost.net.pool import ConnectionPool
from onionpost.net.transport import DirectDialer
from onionpost.store.contacts import ContactStore
from onionpost.store.db import Database
from onionpost.store.outbox import OutboxRow
from onionpost.testing.harness import DeviceNode, InboxNode

KiB = 1 << 10
MiB = 1 << 20
MESSAGE_BYTES = 4 * KiB
DEVICES = 3
DAY = 86_400
#: Both nodes keep connections alive (a ConnectionPool each), as onionpost's Node does; off
#: only to measure what keep-alive saves.
KEEP_ALIVE = True
#: The burst comes from this many SMTP clients at once, each sending its next message as
#: soon as it heard 250 (the SMTP submission bench's ten sessions).
SMTP_CLIENTS = 10
#: Inbox B's limits for the run (the defaults are a few hundred per hour; see InboxConfig).
OPEN_LIMITS: dict[str, object] = {
    "rate_per_mailbox_per_hour": 10_000_000,
    "rate_per_source_per_hour": 10_000_000,
    "rate_strangers_per_mailbox_per_hour": 10_000_000,
    "rate_strangers_per_hour": 10_000_000,
}
_SUBJECT = re.compile(rb"\r\nSubject: bench (\d+)\r\n")


# --- messages ---------------------------------------------------------------------------------


def compose(sender: str, to: str, n: int, *, size: int = MESSAGE_BYTES) -> bytes:
    """A plain-text message of exactly ``size`` bytes (CRLF, 7-bit, short lines)."""
    head = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: bench {n}\r\n"
        f"Message-ID: <bench.{n}.{os.urandom(6).hex()}@bench>\r\n"
        f"Date: {formatdate(usegmt=True)}\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode()
    left = size - len(head)
    line = (os.urandom(36).hex() + "\r\n").encode()  # 74 bytes
    body = (line * (left // len(line) + 1))[: left - 2] + b"\r\n"
    return head + body


def _ref_number(ref: str) -> int | None:
    """The message number in a ``<bench.N.xxx@bench>`` Message-ID."""
    m = re.match(r"<bench\.(-?\d+)\.", ref)
    return int(m.group(1)) if m else None


def message_number(message: bytes) -> int | None:
    m = _SUBJECT.search(message, 0, 4096)
    return int(m.group(1)) if m else None


# --- the crypto-only reference ----------------------------------------------------------------


class _NoReplay:
    def seen(self, msg_id: bytes) -> bool:
        return False


@dataclass
class _CryptoWorld:
    """alice's sending keys, bob's three devices and inbox B's server key: the shapes the
    pipeline uses, without any store."""

    alice: Account
    bob: list[Account]
    server: ServerSecrets
    now: int

    @classmethod
    def make(cls) -> _CryptoWorld:
        now = int(time.time())
        a_srv, b_srv = ServerSecrets.generate(now), ServerSecrets.generate(now)
        alice = create_identity(
            "alice",
            "laptop",
            onion_pk=a_srv.onion_pk,
            sek_id=a_srv.current().sek_id,
            sek_pk=a_srv.current().public,
            now=now,
        )
        bob = create_identity(
            "bob",
            "laptop",
            onion_pk=b_srv.onion_pk,
            sek_id=b_srv.current().sek_id,
            sek_pk=b_srv.current().public,
            now=now,
        )
        devices = [bob] + [add_device(bob, f"device-{i}", now=now) for i in range(2, DEVICES + 1)]
        return cls(alice, devices, b_srv, now)

    def seal(self, body: bytes) -> bytes:
        targets = []
        for d in self.bob:
            p = d.device.current_prekey()
            targets.append(StanzaTarget(p.spk_id, x25519_public(p.secret)))
        l2 = io.BytesIO()
        inner = seal_inner(
            sender=self.alice.sender_keys(),
            targets=targets,
            recipient_uiks=[self.bob[0].uik_pk],
            body=body,
            created_at=self.now,
            expires_at=self.now + DAY,
            sink=l2,
            extensions=[(EXT_SENDER_KEYS, self.alice.credentials())],
        )
        l2.seek(0)
        l1 = io.BytesIO()
        sek = self.server.current()
        seal_outer(
            l2,
            inner.length,
            sek_id=sek.sek_id,
            sek_pk=sek.public,
            mailbox_id=self.bob[0].mailbox_id,
            not_after=inner.expires_at,
            sink=l1,
            token=bytes(32),
        )
        return l1.getvalue()

    def open(self, l1: bytes) -> None:
        l2 = io.BytesIO()
        meta = open_outer(
            io.BytesIO(l1),
            len(l1),
            server_key=lambda i: self.server.current().secret,
            now=self.now,
            max_l2_bytes=1 << 30,
            l2_sink=l2,
        )
        for d in self.bob:
            l2.seek(0)
            open_inner(
                l2,
                meta.l2_len,
                prekeys=d.prekey_secrets(),
                reader_uik=d.uik_pk,
                now=self.now,
                seen=_NoReplay(),
                sink=io.BytesIO(),
            )


def crypto_reference(ctx: Context, repeat: int) -> Stats:
    w = _CryptoWorld.make()
    body = compose("alice@x", "bob@x", 0)
    return ctx.measure(
        f"crypto only (seal + open x{DEVICES})", lambda: w.open(w.seal(body)), repeat=repeat
    )


def pool_speedup(ctx: Context, repeat: int, size: int = MESSAGE_BYTES) -> None:
    """Opening one sync batch (16 fetched 4 KiB messages) in the crypto pool
    (:func:`onionpost.base.aio.crypto_pool`, what :meth:`Receiver.sync_once` does) with 1 worker
    and with 2: libsodium releases the GIL, the Python around it does not."""
    from concurrent.futures import wait

    from onionpost.base.aio import crypto_pool, crypto_workers, set_crypto_workers
    from onionpost.device.sync import BATCH_MESSAGES, _decrypt

    w = _CryptoWorld.make()
    bob = w.bob[0]
    l2s = []
    for i in range(BATCH_MESSAGES):
        l1 = w.seal(compose("alice@x", "bob@x", i, size=size))
        l2 = io.BytesIO()
        open_outer(
            io.BytesIO(l1),
            len(l1),
            server_key=lambda _: w.server.current().secret,
            now=w.now,
            max_l2_bytes=1 << 30,
            l2_sink=l2,
        )
        l2s.append(l2.getvalue())
    prekeys, uik = bob.prekey_secrets(), bob.uik_pk

    def batch() -> None:
        files = []
        for data in l2s:
            f = io.BytesIO(data)
            f.seek(0, 2)
            files.append(f)
        futures = [crypto_pool().submit(_decrypt, f, prekeys, uik, w.now) for f in files]
        wait(futures)
        for fut in futures:
            opened = fut.result()
            opened.body.close()
            assert opened.error is None, opened.error

    default = crypto_workers()
    stats = {}
    try:
        for workers in (1, 2):
            set_crypto_workers(workers)
            label = f"open {BATCH_MESSAGES} x {fmt_bytes(size)}, {workers} worker(s)"
            stats[workers] = ctx.measure(label, batch, repeat=repeat)
    finally:
        set_crypto_workers(None)
    ctx.compare(
        stats[2],
        stats[1],
        extra=f"x{stats[1].p50 / stats[2].p50:.2f} speed-up from the second worker "
        f"(the pool has {default} on this machine)",
    )


def commit_reference(ctx: Context, workdir: Path, repeat: int) -> Stats:
    """One small durable commit through onionpost's Database (WAL, synchronous=FULL)."""
    db = Database(workdir / "commit.db", ())
    try:
        db.execute("CREATE TABLE t (x BLOB)")
        row = os.urandom(64)

        def commit() -> None:
            with db.transaction() as c:
                c.execute("INSERT INTO t VALUES (?)", (row,))

        return ctx.measure("one durable SQLite commit", commit, repeat=repeat, number=20)
    finally:
        db.close()


# --- the loopback world -----------------------------------------------------------------------


class Tracker:
    """When each numbered message was filed, per device (wraps each device's file_message)."""

    def __init__(self, devices: int) -> None:
        self.devices = devices
        self.filed: dict[int, list[float]] = {}
        self.done: dict[int, asyncio.Future[float]] = {}
        self.complete = 0  # messages filed on every device
        self.last_complete = 0.0

    def watch(self, node: DeviceNode) -> None:
        sink = node.sink
        original = sink.deliver

        async def deliver(
            user: str, folder: str, message: Path | bytes, *, header: bytes, seen: bool = False
        ) -> None:
            await original(user, folder, message, header=header, seen=seen)
            n = message_number(message if isinstance(message, bytes) else message.read_bytes())
            if n is not None and folder == "INBOX":
                self._filed(n)

        sink.deliver = deliver  # type: ignore[method-assign]

    def expect(self, n: int) -> asyncio.Future[float]:
        fut = self.done.get(n)
        if fut is None:
            fut = self.done[n] = asyncio.get_running_loop().create_future()
        return fut

    def _filed(self, n: int) -> None:
        times = self.filed.setdefault(n, [])
        times.append(time.perf_counter())
        if len(times) == self.devices:
            self.complete += 1
            self.last_complete = times[-1]
            fut = self.done.get(n)
            if fut is not None and not fut.done():
                fut.set_result(times[-1])


class Commits:
    """Counts COMMITs on a set of SQLite connections (their trace callbacks; a group
    commit's connection calls its own from its thread, so each COMMIT is an append, which
    the GIL makes atomic, not a ``+=``)."""

    def __init__(self) -> None:
        self._commits: list[None] = []
        self._conns: list[object] = []

    @property
    def count(self) -> int:
        return len(self._commits)

    def _trace(self, sql: str) -> None:
        if sql.startswith("COMMIT"):
            self._commits.append(None)

    def attach(self, *dbs: Database) -> None:
        for db in dbs:
            db.conn.set_trace_callback(self._trace)
            self._conns.append(db.conn)

    def detach(self) -> None:
        for conn in self._conns:
            conn.set_trace_callback(None)  # type: ignore[attr-defined]
        self._conns.clear()


async def until(
    what: str,
    step: Callable[[], Awaitable[object]],
    done: Callable[[], bool],
    timeout: float = 30.0,
) -> None:
    """Repeat ``step`` (a sync, a short sleep) until ``done()`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        await step()
        if done():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done within {timeout:.0f} s")
        await asyncio.sleep(0.01)


class _Recipient:
    """Inbox B with bob on ``devices`` devices, each a DeviceNode with its own device.db."""

    def __init__(
        self,
        root: Path,
        clock: Clock,
        dialer: DirectDialer,
        devices: int,
        limits: dict[str, object],
    ) -> None:
        # Node B's kept-alive connections, as a node has one (its devices' requests to
        # their own inbox go through it; so would its deliveries).
        self.pool_b = ConnectionPool(dialer) if KEEP_ALIVE else None
        self.b = InboxNode(root, "inbox-b", clock, dialer, pool=self.pool_b, inbox=limits)
        bob = self.b.provision("bob", "laptop")
        extra = [self.b.add_device(bob, f"device-{i}") for i in range(2, devices + 1)]
        self.bobs = [
            DeviceNode(root, f"bob-{i}", acc, clock, dialer, connections=self.pool_b)
            for i, acc in enumerate([bob, *extra], 1)
        ]
        self.tracker = Tracker(devices)
        for d in self.bobs:
            self.tracker.watch(d)

    @property
    def address(self) -> Address:
        return self.bobs[0].address

    async def receive_first(self) -> None:
        for d in self.bobs:
            await until("first contact", d.device.sync, lambda d=d: _has_mail(d))

    def start_sync(self) -> None:
        for d in self.bobs:
            d.device.start()

    async def close_pool(self) -> None:
        if self.pool_b is not None:
            await self.pool_b.close()


async def stop_device(device: Device) -> None:
    """``Device.stop()``, cancelling its sync task again if the first cancellation was lost.

    ``InboxClient.request`` suppresses ``CancelledError`` around ``writer.wait_closed()``, so
    a cancellation that lands there is swallowed and the sync loop long-polls on: a plain
    ``stop()`` then waits forever (see the benchmark report).  Harmless once that is fixed.
    """
    stopping = asyncio.ensure_future(device.stop())
    while True:
        done, _ = await asyncio.wait({stopping}, timeout=1.0)
        if done:
            stopping.result()
            return
        task = device._task
        if task is not None:
            task.cancel()


async def close_devices(*nodes: DeviceNode) -> None:
    for d in nodes:
        await stop_device(d.device)
        await d.close()


def _has_mail(d: DeviceNode) -> bool:
    return bool(d.filed("INBOX"))


class World(_Recipient):
    """Inbox A with alice (one device), inbox B with bob (``devices`` devices), on loopback."""

    def __init__(
        self, root: Path, clock: Clock, *, devices: int, b_inbox: dict[str, object]
    ) -> None:
        self.root = root
        self.clock = clock
        self.dialer = DirectDialer()
        # Node A's kept-alive connections: alice's to her inbox, inbox A's deliveries to B.
        self.pool_a = ConnectionPool(self.dialer) if KEEP_ALIVE else None
        self.a = InboxNode(root, "inbox-a", clock, self.dialer, pool=self.pool_a)
        super().__init__(root, clock, self.dialer, devices, b_inbox)
        self.alice = DeviceNode(
            root,
            "alice",
            self.a.provision("alice", "laptop"),
            clock,
            self.dialer,
            connections=self.pool_a,
            group_commit=True,  # as a node commits its SMTP clients' submissions
        )
        self.outcome_errors: list[str] = []
        self._outcome_log = _OutcomeErrors(self.outcome_errors)
        self._tasks: list[asyncio.Task[None]] = []
        #: message number -> when inbox A's outbox took it / when A delivered it to B
        self.handed: dict[int, float] = {}
        self.delivered: dict[int, float] = {}
        self._watch_outbox()

    def _watch_outbox(self) -> None:
        # The outbox keeps no Message-ID, so the message number is read where the inbox
        # takes a submission, and remembered by outbox row.
        inbox = self.a.inbox
        submit = inbox.submit
        numbers: dict[int, int] = {}

        def watched(*args: object, **kw: object) -> int:
            row = submit(*args, **kw)  # type: ignore[arg-type]
            n = _ref_number(str(kw.get("message_ref", "")))
            if n is not None:
                numbers[row] = n
                self.handed.setdefault(n, time.perf_counter())
            return row

        inbox.submit = watched  # type: ignore[method-assign]

        def finished(row: OutboxRow) -> None:
            n = numbers.get(row.id)
            if n is not None and row.state == "delivered":
                self.delivered.setdefault(n, time.perf_counter())

        self.a.worker.on_finished.append(finished)

    @property
    def from_(self) -> str:
        return str(self.alice.address)

    @property
    def to(self) -> str:
        return str(self.address)

    @property
    def databases(self) -> list[Database]:
        commit_db = [self.alice.commit_db] if self.alice.commit_db is not None else []
        return [self.a.db, self.b.db, self.alice.db, *commit_db, *(d.db for d in self.bobs)]

    async def start(self) -> None:
        await self.a.start()
        await self.b.start()

    async def introduce(self) -> None:
        """alice writes first (proof of work), bob answers (his answer grants alice a token)."""
        report = await self.alice.device.send(compose(self.from_, self.to, -1), [self.address])
        assert not report.failed, report.failed
        await self.receive_first()
        reply = compose(self.to, self.from_, -2)
        report = await self.bobs[0].device.send(reply, [self.alice.address])
        assert not report.failed, report.failed
        await until(
            "bob's answer", self.alice.device.sync, lambda: _has_token(self.alice.contacts, self.to)
        )

    def submit(self, n: int) -> None:
        self.alice.submissions.submit("alice", [self.address], compose(self.from_, self.to, n))

    async def submit_async(self, n: int) -> None:
        """As the SMTP gateway submits: the commit in the group commit's thread."""
        await self.alice.submissions.submit_async(
            "alice", [self.address], compose(self.from_, self.to, n)
        )

    def start_sealing(self) -> None:
        """alice's node side: the node's "seal" and "outcomes" jobs, her own long-poll sync."""
        logging.getLogger("onionpost.app.node").addHandler(self._outcome_log)
        self.alice.start_jobs()
        self.alice.device.start()

    async def close(self) -> None:
        logging.getLogger("onionpost.app.node").removeHandler(self._outcome_log)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await close_devices(self.alice, *self.bobs)
        if self.pool_a is not None:
            await self.pool_a.close()
        await self.close_pool()
        await asyncio.gather(self.a.stop(), self.b.stop())
        self.a.close()
        self.b.close()


class _OutcomeErrors(logging.Handler):
    """Collects the outcome checks that failed (the "outcomes" job logs and carries on)."""

    def __init__(self, into: list[str]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("could not check the outbox"):
            self.into.append(record.getMessage())


def _has_token(contacts: ContactStore, to: str) -> bool:
    """alice holds a contact token for ``to`` (his answer granted it)."""
    contact = contacts.get(to)
    return contact is not None and contact.token_to_them is not None


async def wait_all(futs: list[asyncio.Future[float]], timeout: float, what: str) -> list[float]:
    try:
        async with asyncio.timeout(timeout):
            return list(await asyncio.gather(*futs))
    except TimeoutError:
        done = sum(f.done() for f in futs)
        raise RuntimeError(
            f"{what}: only {done} of {len(futs)} filed after {timeout:.0f} s"
        ) from None


def fmt_rate(n: int, seconds: float) -> str:
    return f"{n / seconds:,.1f} msg/s" if seconds > 0 else "inf msg/s"


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Result:
    burst: int
    burst_seconds: float = 0.0
    burst_filed: int = 0  # how many of the burst were filed everywhere (all, unless timed out)
    burst_cpu: float = 0.0
    commits: int = 0
    first_device: list[float] = field(default_factory=list)
    all_devices: list[float] = field(default_factory=list)
    #: per sequential message: (its number, when it was submitted)
    hops: list[tuple[int, float]] = field(default_factory=list)
    split: list[tuple[str, float]] = field(default_factory=list)  # (hop, p50 seconds)
    notes: list[str] = field(default_factory=list)


async def _sequential_then_burst(
    submit: Callable[[int], Awaitable[None]],
    tracker: Tracker,
    result: Result,
    *,
    sequential: int,
    timeout: float,
    commits: Commits | None = None,
    dbs: tuple[Database, ...] = (),
) -> None:
    n = 0
    for _ in range(3):  # warm up the path (connections, statement caches, bundle cache)
        n += 1
        fut = tracker.expect(n)
        await submit(n)
        await wait_all([fut], 60, "warm-up")
    for _ in range(sequential):  # latency: one message in flight
        n += 1
        fut = tracker.expect(n)
        t0 = time.perf_counter()
        await submit(n)
        (t_all,) = await wait_all([fut], 60, "sequential")
        result.first_device.append(min(tracker.filed[n]) - t0)
        result.all_devices.append(t_all - t0)
        result.hops.append((n, t0))
    # throughput: a burst, submitted as fast as the SMTP gateway would take it from
    # SMTP_CLIENTS clients at once, each sending its next message once it heard 250
    ids = list(range(n + 1, n + 1 + result.burst))
    futs = [tracker.expect(i) for i in ids]
    before = tracker.complete
    if commits is not None:
        commits.attach(*dbs)
    c0, t0 = time.process_time(), time.perf_counter()
    try:

        async def client(mine: list[int]) -> None:
            for i in mine:
                await submit(i)

        await asyncio.gather(*(client(ids[k::SMTP_CLIENTS]) for k in range(SMTP_CLIENTS)))
        ends = await wait_all(futs, timeout, "burst")
        result.burst_seconds = max(ends) - t0
        result.burst_filed = result.burst
    except RuntimeError:
        result.burst_seconds = time.perf_counter() - t0
        result.burst_filed = tracker.complete - before
    result.burst_cpu = time.process_time() - c0
    if commits is not None:
        commits.detach()
        result.commits = commits.count


async def measure_harness(root: Path, *, burst: int, sequential: int) -> Result:
    w = World(root, SystemClock(), devices=DEVICES, b_inbox=OPEN_LIMITS)
    await w.start()
    result = Result(burst)
    try:
        await w.introduce()
        w.start_sealing()
        w.start_sync()
        await _sequential_then_burst(
            w.submit_async,
            w.tracker,
            result,
            sequential=sequential,
            timeout=300,
            commits=Commits(),
            dbs=tuple(w.databases),
        )
        result.split = _split(result, w)
        if w.outcome_errors:
            result.notes.append(
                f"alice's outcome checks (every 60 s) failed {len(w.outcome_errors)}x: "
                f"{w.outcome_errors[-1]}"
            )
    finally:
        await w.close()
    return result


def _split(r: Result, w: World) -> list[tuple[str, float]]:
    """Median time of each hop of the sequential messages."""
    hops: dict[str, list[float]] = {}
    for n, t0 in r.hops:
        filed = w.tracker.filed.get(n, [])
        if n not in w.handed or n not in w.delivered or len(filed) < w.tracker.devices:
            continue
        for name, value in (
            ("submit, seal, hand to A", w.handed[n] - t0),
            ("A delivers to B", w.delivered[n] - w.handed[n]),
            ("first device filed", min(filed) - w.delivered[n]),
            ("last device filed", max(filed) - min(filed)),
        ):
            hops.setdefault(name, []).append(value)
    return [(name, statistics.median(v)) for name, v in hops.items()]


async def measure_node(root: Path, *, burst: int, sequential: int, timeout: float) -> Result:
    """The sender is a full onionpost Node (scheduler-driven), the recipient the harness's."""
    from onionpost.app.node import Node
    from onionpost.app.provision import initialize
    from onionpost.base.config import load

    clock = SystemClock()
    dialer = DirectDialer()
    config = load(root / "node", {"tor": {"mode": "off"}})
    initialize(config, local="alice", device_name="laptop", now=clock.now())
    rcpt = _Recipient(root, clock, dialer, DEVICES, OPEN_LIMITS)
    node = Node(config, dialer=dialer, extensions=())
    result = Result(burst)
    await rcpt.b.start()
    await node.start()
    try:
        alice = node.devices["alice"]
        submissions = node.submissions
        assert submissions is not None
        to, sender = str(rcpt.address), str(alice.address)
        report = await alice.send(compose(sender, to, -1), [rcpt.address])
        assert not report.failed, report.failed
        await rcpt.receive_first()
        report = await rcpt.bobs[0].device.send(compose(to, sender, -2), [alice.address])
        assert not report.failed, report.failed
        contacts = alice.contacts
        await until("bob's answer", _nothing, lambda: _has_token(contacts, to))
        rcpt.start_sync()

        async def submit(n: int) -> None:
            await submissions.submit_async("alice", [rcpt.address], compose(sender, to, n))

        await _sequential_then_burst(
            submit, rcpt.tracker, result, sequential=sequential, timeout=timeout
        )
    finally:
        await close_devices(*rcpt.bobs)
        await rcpt.close_pool()
        for device in node.devices.values():
            await stop_device(device)
        await asyncio.gather(node.stop(), rcpt.b.stop())
        rcpt.b.close()
    return result


async def _nothing() -> None:
    await asyncio.sleep(0.02)


def sealing_stall(ctx: Context, repeat: int, size: int) -> None:
    """The longest the event loop goes unserved while one large message is sealed: by
    :func:`onionpost.device.sending.seal_step` (in the crypto pool from
    ``SEAL_IN_POOL_FROM`` on) against the same seal run on the loop, as every seal was
    before.  A 1 ms timer on the loop measures the stall: on the loop, an SMTP client
    waiting for its 250 waits that long."""
    import functools

    from onionpost.device.sending import SEAL_IN_POOL_FROM, seal_step

    w = _CryptoWorld.make()
    body = compose("alice@x", "bob@x", 0, size=size)

    async def stall(in_pool: bool) -> tuple[float, float]:
        worst, done = 0.0, False

        async def ticker() -> None:
            nonlocal worst
            while not done:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - t - 0.001)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        if in_pool:
            await seal_step(functools.partial(w.seal, body), len(body), None)
        else:
            w.seal(body)
        took = time.perf_counter() - t0
        done = True
        await task
        return worst, took

    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(repeat):
        for in_pool in (False, True):
            runs[in_pool].append(asyncio.run(stall(in_pool)))
    label = fmt_bytes(size)
    on_loop = Stats(f"loop stall, seal {label} on the loop", tuple(s for s, _ in runs[False]))
    pooled = Stats(f"loop stall, seal {label} seal_step", tuple(s for s, _ in runs[True]))
    took = statistics.median(t for _, t in runs[True])
    ctx.compare(
        pooled,
        on_loop,
        extra=f"the seal itself {fmt_time(took)}; sealed in the crypto pool from "
        f"{fmt_bytes(SEAL_IN_POOL_FROM)} on, smaller ones on the loop",
    )


# --- the section ------------------------------------------------------------------------------


def run(ctx: Context) -> None:
    burst = 40 if ctx.quick else 500
    node_burst = 20 if ctx.quick else 500
    sequential = 10 if ctx.quick else 200
    ref = crypto_reference(ctx, repeat=20 if ctx.quick else 200)
    pool_speedup(ctx, repeat=5 if ctx.quick else 30)
    pool_speedup(ctx, repeat=3 if ctx.quick else 10, size=256 * KiB)
    sealing_stall(ctx, repeat=2 if ctx.quick else 5, size=(4 if ctx.quick else 20) * MiB)
    before = rss_bytes()
    reset_peak_rss()
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-") as d:
        harness = asyncio.run(measure_harness(Path(d, "h"), burst=burst, sequential=sequential))
        peak = peak_rss_bytes()
        commit = commit_reference(ctx, Path(d), repeat=5 if ctx.quick else 20)
        node = asyncio.run(
            measure_node(
                Path(d, "n"),
                burst=node_burst,
                sequential=3 if ctx.quick else 30,
                timeout=60 if ctx.quick else 300,
            )
        )
    ctx.heading(
        f"{fmt_bytes(MESSAGE_BYTES)} messages, alice (inbox A) -> bob (inbox B, {DEVICES} "
        "devices) over the node API on 127.0.0.1; delivered = filed on all three devices"
    )
    _report(ctx, "harness loops", harness, ref)
    if harness.commits:
        per = harness.commits / harness.burst
        ctx.compare(
            Stats("SQLite commits per message", (per * commit.p50,)),
            commit,
            extra=f"{per:.1f} commits (all six databases) x one commit",
        )
    ctx.figure(
        "CPU per message (one process)",
        fmt_time(harness.burst_cpu / harness.burst),
        extra=f"x{harness.burst_cpu / harness.burst / ref.p50:.0f} crypto only; both inboxes and "
        "all four devices share one event loop",
    )
    if peak is not None:
        ctx.figure(
            "peak RSS (whole process)",
            fmt_bytes(peak),
            extra=f"RSS before the run {fmt_bytes(before or 0)}; 2 inboxes + 4 devices in-process",
        )
    ctx.heading(
        "the same, with a full onionpost Node as the sender (its scheduler seals and delivers)"
    )
    _report(ctx, "Node sender", node, ref)


def _report(ctx: Context, label: str, r: Result, ref: Stats) -> None:
    if r.burst_filed == r.burst:
        per_msg = Stats(f"{label}, burst of {r.burst}", (r.burst_seconds / r.burst,))
        ctx.compare(
            per_msg,
            ref,
            extra=f"{fmt_rate(r.burst, r.burst_seconds)} vs {fmt_rate(1, ref.p50)} crypto only",
        )
    else:
        ctx.figure(
            f"{label}, burst of {r.burst}",
            f"{r.burst_filed} filed in {fmt_time(r.burst_seconds)}",
            extra=f"TIMED OUT: {fmt_rate(r.burst_filed, r.burst_seconds)} vs "
            f"{fmt_rate(1, ref.p50)} crypto only",
        )
    for name, values in (("first device", r.first_device), ("all three devices", r.all_devices)):
        if not values:
            continue
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        ctx.figure(
            f"latency to {name}, p50 / p99",
            f"{fmt_time(p50)} / {fmt_time(p99)}",
            extra=f"x{p50 / ref.p50:.0f} / x{p99 / ref.p50:.0f} crypto only "
            f"(n={len(values)}, one message in flight)",
        )
    if r.split:
        ctx.figure(
            "latency split, p50 of each hop",
            fmt_time(sum(v for _, v in r.split)),
            extra=" | ".join(f"{name} {fmt_time(v)}" for name, v in r.split),
        )
    for note in r.notes:
        ctx.note(note)
