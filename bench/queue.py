"""Store-and-forward: draining a backlog to an inbox that comes back, and a node's idle cost.

**Drain.**  The loopback world of :mod:`bench.delivery` (inbox A with alice, inbox B with bob,
here with one device) on a :class:`~onionpost.base.clock.FakeClock`.  alice and bob exchange a
first message (so alice holds bob's keys and a contact token), then inbox B and bob's device
go away.  alice submits the backlog; the sealing loop seals each message with the cached
keys and hands it to inbox A, whose outbox worker tries it once, finds B offline and defers
it (60 s +-25 %, fake time).  Then B and bob's device come back, the fake clock is advanced
90 s so that every row is due, the worker is woken, and the clock is read when the last row
is delivered to inbox B and when the last message is filed on bob's device.  The reference
is the same number of messages in a fresh world where B was never down, timed from the
first submission (so it includes sealing, which the drain had done beforehand).

**Spooled backlog.**  An inbox database alone (:class:`~onionpost.store.inbox.InboxStore`):
the time to store one more 16 KiB envelope for a device whose backlog is already 1,000 or
10,000 envelopes (a phone off for weeks), against an empty spool.  Without fsync, so that
what is compared is the work a delivery does, not the disk.

**Idle.**  A full :class:`onionpost.app.node.Node` (role "both", tor off, no gateway extensions,
a data directory made by :func:`onionpost.app.provision.initialize`) in a child process: its CPU
time over a window of idleness after start-up has settled, as % of one core, against an
asyncio loop with nothing scheduled, in another child process, over the same window.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.delivery import OPEN_LIMITS, Commits, World, fmt_rate, stop_device
from bench.harness import Context, Stats, fmt_time
from onionpost.base.clock import FakeClock
from onionpost.store.outbox import OutboxRow

BACKOFF_SKIP = 90  # fake seconds: past the first retry (60 s +25 % jitter)
#: The slow-link drain: seconds before each request bob's device makes to inbox B.
SLOW_LINK = 0.05


@dataclass
class _Phase:
    """Seconds from the start of a phase until all rows were delivered / all filed."""

    queued: float  # reference: 0; drain: how long the backlog took to build
    delivered: float
    filed: float
    outcome_errors: list[str]  # alice's 60-s outcome checks that failed
    cost: _Cost | None = None  # the drain's CPU and commits, from B's return to the last filing


@dataclass
class _Cost:
    """CPU seconds (the whole process) and SQLite commits (every database of the world)
    over a phase: less sensitive to a loaded machine than its rate."""

    cpu: float = 0.0
    commits: int = 0


def _start_cost(w: World) -> tuple[Commits, float]:
    commits = Commits()
    commits.attach(*w.databases)
    return commits, time.process_time()


def _end_cost(started: tuple[Commits, float]) -> _Cost:
    commits, c0 = started
    commits.detach()
    return _Cost(time.process_time() - c0, commits.count)


class _Counter:
    """Counts outbox rows delivered by inbox A's worker (its on_finished hook)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.delivered = 0
        self.at = 0.0
        self.all_delivered: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def __call__(self, row: OutboxRow) -> None:
        if row.state != "delivered":
            return
        self.delivered += 1
        if self.delivered == self.target and not self.all_delivered.done():
            self.all_delivered.set_result(time.perf_counter())


async def _wait_until(what: str, check: object, timeout: float, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:.0f} s")
        await asyncio.sleep(poll)


async def _world(root: Path, clock: FakeClock) -> World:
    w = World(root, clock, devices=1, b_inbox=OPEN_LIMITS)
    await w.start()
    await w.introduce()
    return w


async def _reference(root: Path, n: int, timeout: float) -> _Phase:
    w = await _world(root, FakeClock(int(time.time())))
    try:
        counter = _Counter(n)
        w.a.worker.on_finished.append(counter)
        w.start_sealing()
        w.start_sync()
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            w.submit(i)
            await asyncio.sleep(0)
        async with asyncio.timeout(timeout):
            delivered = await counter.all_delivered
        await _wait_until("reference filing", lambda: w.tracker.complete >= n, timeout)
        return _Phase(0.0, delivered - t0, w.tracker.last_complete - t0, w.outcome_errors)
    finally:
        await w.close()


def _slow_link(w: World, delay: float) -> None:
    """Every request bob's devices make to inbox B waits ``delay`` seconds first: on
    loopback, a link with a round trip of about that (a laptop whose inbox is a Pi at home
    reaches it over tor, hundreds of milliseconds)."""
    for d in w.bobs:
        client = d.device.session.client
        exchange = client._exchange

        async def slow(exchange: Any = exchange, **kw: Any) -> Any:
            await asyncio.sleep(delay)
            return await exchange(**kw)

        client._exchange = slow  # type: ignore[method-assign]


async def _drain(root: Path, n: int, timeout: float, *, device_link: float = 0.0) -> _Phase:
    clock = FakeClock(int(time.time()))
    w = await _world(root, clock)
    if device_link:
        _slow_link(w, device_link)
    try:
        await w.b.stop()  # inbox B goes away, and bob's device with it
        w.start_sealing()
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            w.submit(i)
            await asyncio.sleep(0)
        deferred = "SELECT count(*) FROM outbox WHERE state = 'queued' AND attempts > 0"
        await _wait_until("queueing", lambda: w.a.db.scalar(deferred) >= n, timeout, poll=0.1)
        queued = time.perf_counter() - t0

        counter = _Counter(n)
        w.a.worker.on_finished.append(counter)
        await w.b.start()  # B is back (a new port; the dialer learns it), and bob's device
        w.start_sync()
        clock.advance(BACKOFF_SKIP)
        cost = _start_cost(w)
        t0 = time.perf_counter()
        w.a.scheduler.wake("deliver")
        async with asyncio.timeout(timeout):
            delivered = await counter.all_delivered
        await _wait_until("drain filing", lambda: w.tracker.complete >= n, timeout)
        return _Phase(
            queued,
            delivered - t0,
            w.tracker.last_complete - t0,
            w.outcome_errors,
            _end_cost(cost),
        )
    finally:
        await w.close()


# --- a spooled backlog -------------------------------------------------------------------------

SPOOLED_BYTES = 16 << 10  # the smallest padding bucket


def _backlog_section(ctx: Context, backlogs: tuple[int, ...], sample: int) -> None:
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-spool-") as d:
        times = _accept_times(Path(d, "inbox.db"), backlogs, sample)
    ctx.heading(
        f"Storing one more {SPOOLED_BYTES >> 10} KiB envelope for a device that has not fetched "
        f"its backlog (InboxStore.accept_sealed, no fsync; median of {sample})"
    )
    empty = Stats("an empty spool", times[0])
    for backlog, samples in zip(backlogs[1:], times[1:], strict=True):
        ctx.compare(Stats(f"{backlog:,} envelopes spooled", samples), empty)


def _accept_times(path: Path, backlogs: tuple[int, ...], sample: int) -> list[list[float]]:
    import io

    from onionpost.store.db import Database
    from onionpost.store.inbox import InboxStore

    db = Database(path, ("inbox",), record_key=b"k" * 32)
    mb, dev = b"M" * 16, b"d" * 16
    db.conn.execute(
        "INSERT INTO mailboxes (mailbox_id, local, uik_pk, binding, device_list,"
        " device_list_version, created_at) VALUES (?, 'bob', x'00', x'00', x'', 0, 0)",
        (mb,),
    )
    db.conn.execute(
        "INSERT INTO devices (mailbox_id, device_id, name, dsk_seq, dsk_pk)"
        " VALUES (?, ?, 'phone', 0, x'00')",
        (mb, dev),
    )
    store, body, count = InboxStore(db), os.urandom(SPOOLED_BYTES), 0

    def accept() -> float:
        nonlocal count
        count += 1
        t0 = time.perf_counter()
        with db.transaction(durable=False):
            store.accept_sealed(
                mailbox_id=mb, digest=count.to_bytes(32, "big"), size=SPOOLED_BYTES,
                source=io.BytesIO(body), device_ids=[dev], receipt="r", now=0,
                spool_until=1 << 40, dedup_until=1 << 40, quota_bytes=1 << 50,
            )  # fmt: skip
        return time.perf_counter() - t0

    times: list[list[float]] = []
    try:
        for backlog in backlogs:
            while count < backlog:
                with db.transaction(durable=False):  # the backlog, a thousand per commit
                    for _ in range(min(1000, backlog - count)):
                        accept()
            times.append([accept() for _ in range(sample)])
    finally:
        db.close()
    return times


# --- idle CPU ---------------------------------------------------------------------------------


def _idle_child(kind: str, settle: float, window: float) -> dict[str, float]:
    """Run in a fresh process: start ``kind`` ("loop", "node" or "node:BACKLOG" for a node
    with that many deferred outbox rows), settle, measure ``window``."""
    return asyncio.run(_idle(kind, settle, window))


async def _idle(kind: str, settle: float, window: float) -> dict[str, float]:
    node = None
    tmp = None
    stop_seconds = 0.0
    if kind.startswith("node"):
        from onionpost.app.node import Node
        from onionpost.app.provision import initialize
        from onionpost.base.config import load

        tmp = tempfile.TemporaryDirectory(prefix="onionpost-bench-idle-")
        data = Path(tmp.name) / "node"
        config = load(data, {"tor": {"mode": "off"}})
        initialize(config, local="alice", device_name="laptop", now=int(time.time()))
        _, _, backlog = kind.partition(":")
        if backlog:
            _queue_rows(data, int(backlog))
        node = Node(config, extensions=())
        await node.start()
    try:
        c0, w0 = _cpu(), time.perf_counter()
        await asyncio.sleep(settle)
        c1, w1, s1 = _cpu(), time.perf_counter(), _switches()
        await asyncio.sleep(window)
        c2, w2, s2 = _cpu(), time.perf_counter(), _switches()
    finally:
        if node is not None:
            t = time.perf_counter()
            for device in node.devices.values():
                await stop_device(device)
            await node.stop()
            stop_seconds = time.perf_counter() - t
        if tmp is not None:
            tmp.cleanup()
    return {
        "settle_cpu": c1 - c0,
        "settle_wall": w1 - w0,
        "cpu": c2 - c1,
        "wall": w2 - w1,
        "wakeups": s2 - s1,
        "stop": stop_seconds,
    }


def _queue_rows(data: Path, n: int) -> None:
    """``n`` rows in the node's outbox for an unreachable inbox, next attempt in a day
    (nothing is due during the measurement: what remains is the node's periodic work)."""
    from onionpost.core.address import Address
    from onionpost.core.crypto.keys import ServerSecrets
    from onionpost.store import INBOX_COMPONENTS
    from onionpost.store.db import Database
    from onionpost.store.keystore import AccountFiles, KeyStore
    from onionpost.store.outbox import OutboxStore

    now = int(time.time())
    alice = AccountFiles(KeyStore(data)).load("alice")
    to = Address.for_key("bob", ServerSecrets.generate(now).onion_pk).onion
    key = KeyStore(data).load_server().record_key()
    db = Database(data / "inbox.db", INBOX_COMPONENTS, record_key=key)
    try:
        outbox = OutboxStore(db)
        for i in range(n):
            row = outbox.enqueue(
                mailbox_id=alice.mailbox_id,
                device_id=alice.device.device_id,
                onion=to,
                envelope=os.urandom(5000),
                submission_key=f"bench-{i}",
                now=now,
                expires_at=now + 5 * 86_400,
            )
            outbox.mark_deferred(
                row,
                now=now,
                next_attempt_at=now + 86_400,
                error="The recipient's inbox is offline (connection refused).",
                code="4.4.1",
            )
    finally:
        db.close()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _switches() -> float:
    """Voluntary context switches of the process so far (each one an idle loop wake-up)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return float(r.ru_nvcsw)


def _run_idle_child(kind: str, settle: float, window: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.queue", "--idle", kind, str(settle), str(window)],
        cwd=Path(__file__).resolve().parents[1],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"idle child ({kind}) failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- the section ------------------------------------------------------------------------------


def run(ctx: Context) -> None:
    n = 100 if ctx.quick else 10_000
    timeout = 120.0 if ctx.quick else 3600.0
    _drain_section(ctx, n, timeout)
    _backlog_section(ctx, (0, 100) if ctx.quick else (0, 1_000, 10_000), 20 if ctx.quick else 300)
    _idle_section(
        ctx,
        settle=0.3 if ctx.quick else 11.0,
        window=1.0 if ctx.quick else 10.0,
        backlog=0 if ctx.quick else 10_000,
    )


def _drain_section(ctx: Context, n: int, timeout: float) -> None:
    n_slow = n // 5
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-") as d:
        ref = asyncio.run(_reference(Path(d, "reference"), n, timeout))
        drain = asyncio.run(_drain(Path(d, "drain"), n, timeout))
        slow = asyncio.run(_drain(Path(d, "slow"), n_slow, timeout, device_link=SLOW_LINK))
    ctx.heading(
        f"{n} queued 4.0 KiB messages to an inbox that was down (one recipient device); "
        f"reference: {n} with the inbox up from the start"
    )
    ctx.figure(
        "backlog built (submit+seal+1st try)",
        fmt_time(drain.queued),
        extra=f"{fmt_rate(n, drain.queued)} while inbox B was down",
    )
    for label, d_secs, r_secs in (
        ("delivered to inbox B", drain.delivered, ref.delivered),
        ("filed on bob's device", drain.filed, ref.filed),
    ):
        ctx.compare(
            Stats(f"drain: all {label}", (d_secs,)),
            Stats("inbox up from the start", (r_secs,)),
            extra=f"{fmt_rate(n, d_secs)} vs {fmt_rate(n, r_secs)}",
        )
    ctx.compare(
        Stats(
            f"{n_slow}, {SLOW_LINK * 1e3:.0f} ms link: per message filed", (slow.filed / n_slow,)
        ),
        Stats("the drain above", (drain.filed / n,)),
        extra=f"{fmt_rate(n_slow, slow.filed)} vs {fmt_rate(n, drain.filed)}; "
        f"{SLOW_LINK * 1e3:.0f} ms before each of bob's device requests",
    )
    _drain_cost(ctx, n, drain)
    ctx.note(
        f"(drain times start when B is back and the fake clock has skipped {BACKOFF_SKIP} s "
        "of backoff; reference times start at the first submission)"
    )
    for name, phase in (("reference", ref), ("drain", drain)):
        if phase.outcome_errors:
            ctx.note(
                f"{name}: alice's outcome checks (every 60 s) failed "
                f"{len(phase.outcome_errors)}x: {phase.outcome_errors[-1]}"
            )


def _drain_cost(ctx: Context, n: int, drain: _Phase) -> None:
    """The drain's CPU and commits per message: figures a loaded machine moves less than
    its rates."""
    if drain.cost is None:
        return
    ctx.figure(
        "drain: CPU per message (one process)",
        fmt_time(drain.cost.cpu / n),
        extra="both inboxes and both devices share one process",
    )
    ctx.figure(
        "drain: SQLite commits per message",
        f"{drain.cost.commits / n:.2f}",
        extra="all five databases, from B's return until the last message is filed",
    )


def _idle_section(ctx: Context, *, settle: float, window: float, backlog: int) -> None:
    loop = _run_idle_child("loop", settle, window)
    node = _run_idle_child("node", settle, window)
    cases = [("Node (tor off, no gateway), idle", node)]
    if backlog:
        busy = _run_idle_child(f"node:{backlog}", settle, window)
        cases.append((f"the same, {backlog:,} rows deferred", busy))
    ctx.heading(
        f"idle CPU over {window:.0f} s, after {settle:.1f} s to settle; a fresh process each; "
        "% of one core"
    )
    ref = _pct(loop)
    ref_wakeups = loop["wakeups"] / loop["wall"]
    for name, r in cases:
        ratio = _pct(r) / ref if ref > 0 else float("inf")
        ctx.figure(
            name,
            f"{_pct(r):.3f} % ({r['cpu'] * 1e3:.1f} ms)",
            extra=f"vs idle asyncio loop {ref:.3f} % ({loop['cpu'] * 1e3:.1f} ms)   x{ratio:.0f}"
            f"; wake-ups {r['wakeups'] / r['wall']:.1f}/s vs {ref_wakeups:.1f}/s",
        )
    ctx.figure(
        "Node start-up, settling",
        f"{_pct(node, 'settle_'):.2f} %",
        extra=f"{node['settle_cpu'] * 1e3:.0f} ms CPU in the {node['settle_wall']:.1f} s after "
        f"start() returned; Node.stop() took {fmt_time(node['stop'])}",
    )


def _pct(r: dict[str, float], prefix: str = "") -> float:
    return 100 * r[f"{prefix}cpu"] / r[f"{prefix}wall"]


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--idle":
        result = _idle_child(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        print(json.dumps(result))
    else:
        sys.exit("usage: python -m bench.queue --idle node[:BACKLOG]|loop SETTLE WINDOW")
