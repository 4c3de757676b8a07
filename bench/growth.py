"""Cost growth: delivery rate and RSS with 1k, 10k and 100k messages already in the mailbox,
and the crypto worker pool at 1 and 2 workers on the same delivery workload.

Two real ``onionpost run`` processes (alice's node and bob's, tor off, each other's inbox on
a static loopback route: :class:`bench.memory.NodeProcess`), each with its private Dovecot.
A *burst* is 4 KiB messages submitted over SMTP to alice's gateway (a few sessions at
once), sealed, delivered to bob's inbox, fetched by bob's device, opened, verified and filed
into bob's Dovecot through LMTP.  Its rate is the number of messages over the time from the
first submission to the last "filed ... into bob's INBOX" line of bob's node log (read, not
polled through IMAP, so the measurement does not touch the mailbox).

**The pre-fill.**  Filing 100,000 messages through the whole path would take over an hour
here, so before each size bob's node is stopped and his mailbox brought to that size the way
it would look after that many deliveries, without the path:

* INBOX: Maildir files written straight into ``cur/`` (2 KiB each, with the
  ``Return-Path`` and ``X-Onionpost-Filing`` lines filed mail carries, seen, LF line ends,
  the ``S=``/``W=`` sizes in the name as Dovecot writes them), owned by Dovecot's mail
  account; once the node is up, a ``doveadm force-resync`` reads the folder (uidlist and index
  built, as a client's first SELECT would) and ``doveadm mailbox status`` checks the count.
* bob's ``device.db``: a ``mailbox_seen_ids`` row per message (what the device records for
  each message it took from the inbox; expiring in four days, so none is pruned meanwhile).
* bob's ``inbox.db``: a ``seen_digests`` row per message (the inbox's duplicate check).

Those are the only records a filed message leaves: the filing queue, the sealed copy and
its spool rows are deleted once it is filed and acknowledged.  alice's Sent folder is
pre-filled to the same size the same way (files only), and her ``sent_copy_wait_seconds`` is
2 s, so the Sent copies of the burst (a search for the client's own copy, then an IMAP
``APPEND (\\Seen)``) are filed during the measurement; the time to the last of them is a row
of its own.  A header search of bob's whole INBOX and one from a UID
floor are timed after each burst.

RSS is bob's node process (``/proc/<pid>/status``; Dovecot's processes are not counted):
the peak (``VmHWM``, reset before the burst) and after the burst once idle.  The reference
of each row is the same burst into the smallest mailbox, in the same run: flat is the goal.

``BENCH_GROWTH_SIZES=1000,100000`` runs only those sizes, ``BENCH_GROWTH_POOL=0`` skips the
pool rows (both for before/after comparisons that need only some rows).

**The pool.**  Before the growth rows, the same burst runs with bob's node configured
``delivery.crypto_workers = 1`` and then ``2`` (restarted in between), into the smallest
mailbox: the speed-up of the whole delivery from the second worker, not only of the crypto.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

from bench.delivery import compose
from bench.harness import Context, Stats, fmt_bytes, fmt_time
from bench.memory import NodeProcess, _passable_tmp

SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (200, 2_000)
BURST = 300
QUICK_BURST = 30
SESSIONS = 4  # SMTP sessions submitting at once
FILL_BYTES = 2 << 10
FILED_TIMEOUT = 600.0
SENT_COPY_WAIT = 2  # alice's gateway.sent_copy_wait_seconds: her Sent copies file during the burst
SENT_LIMIT = 300.0  # how long the burst's Sent copies are waited for (the filer logs per batch)
OPEN_LIMIT = 10_000_000  # the inbox's hourly rate limits, out of the way


class GrowthNode(NodeProcess):
    """A node whose configuration also raises the inbox's rate limits and sizes the pool."""

    crypto_workers = 0
    sent_copy_wait = 60
    _read = 0  # bytes of the log counted so far

    def __init__(self, root: Path, user: str) -> None:
        super().__init__(root, user)
        self._counts: dict[str, int] = {}

    def configure(self, peer: NodeProcess | None) -> None:
        routes = (
            f'static_routes = {{ "{peer.address.onion}" = "127.0.0.1:{peer.api}" }}\n'
            if peer is not None
            else ""
        )
        limits = "".join(
            f"{name} = {OPEN_LIMIT}\n"
            for name in (
                "rate_per_mailbox_per_hour",
                "rate_per_source_per_hour",
                "rate_strangers_per_mailbox_per_hour",
                "rate_strangers_per_hour",
            )
        )
        (self.dir / "onionpost.toml").write_text(
            '[tor]\nmode = "off"\n'
            + routes
            + f"[inbox]\nlisten_port = {self.api}\npow_bits = 4\nlongpoll_seconds = 2.0\n"
            + limits
            + f"[gateway]\nsmtp_port = {self.smtp}\nimap_port = {self.imap}\n"
            f"autoconfig_port = {self.auto}\nsent_copy_wait_seconds = {self.sent_copy_wait}\n"
            "[delivery]\nretry_min_seconds = 1\nretry_max_seconds = 2\n"
            f"crypto_workers = {self.crypto_workers}\n",
            encoding="utf-8",
        )

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    # -- what the log says was filed --------------------------------------------------------

    def filed(self, folder: str = "INBOX") -> int:
        """How many "filed ... into <user>'s <folder>" lines the node's log holds (read on
        from where the last call stopped, whole lines only)."""
        try:
            with self.log.open("rb") as f:
                f.seek(self._read)
                data = f.read()
        except OSError:
            data = b""
        whole = data.rfind(b"\n") + 1
        self._read += whole
        for name in ("INBOX", "Sent"):
            pattern = rf"filed [0-9a-f]+ into {re.escape(self.user)}'s {name}\b".encode()
            self._counts[name] = self._counts.get(name, 0) + len(re.findall(pattern, data[:whole]))
        return self._counts.get(folder, 0)

    # -- Dovecot, through the node's own configuration ----------------------------------

    def doveadm(self, *args: str) -> str:
        conf = self.dir / "dovecot" / "dovecot.conf"
        out = subprocess.run(
            ["doveadm", "-c", str(conf), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
        return out.stdout

    def inbox_messages(self, folder: str = "INBOX") -> int:
        out = self.doveadm("mailbox", "status", "-u", self.user, "messages", folder)
        m = re.search(r"messages=(\d+)", out)
        return int(m.group(1)) if m else -1


@dataclass
class Burst:
    messages: int
    mailbox: int  # messages in bob's INBOX before it
    seconds: float  # first submission -> last filed in bob's INBOX
    sent_seconds: float  # first submission -> alice's last Sent copy filed (or the limit)
    sent_filed: int  # Sent copies filed by then (all, unless SENT_LIMIT ran out)
    peak: int
    after: int

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def run(ctx: Context) -> None:
    sizes = QUICK_SIZES if ctx.quick else SIZES
    if os.environ.get("BENCH_GROWTH_SIZES"):  # e.g. "1000,100000": only the sizes needed
        sizes = tuple(int(n) for n in os.environ["BENCH_GROWTH_SIZES"].split(","))
    burst = QUICK_BURST if ctx.quick else BURST
    with _passable_tmp() as root:
        alice, bob = GrowthNode(root, "alice"), GrowthNode(root, "bob")
        try:
            _measure(ctx, alice, bob, sizes, burst)
        finally:
            bob.stop()
            alice.stop()


def _measure(
    ctx: Context, alice: GrowthNode, bob: GrowthNode, sizes: tuple[int, ...], burst: int
) -> None:
    alice.sent_copy_wait = SENT_COPY_WAIT
    alice.configure(bob)
    bob.configure(alice)
    for node in (alice, bob):
        node.start()
    for node in (alice, bob):
        node.wait_ready()
    _introduce(alice, bob)
    inbox = _Filler(bob, "INBOX", records=True)
    sent = _Filler(alice, "Sent", records=False)
    inbox.have, sent.have = bob.inbox_messages(), alice.inbox_messages("Sent")

    ctx.heading(
        f"the crypto pool: bursts of {burst} x 4.0 KiB alice -> bob (two `onionpost run`, "
        f"tor off, filed through bob's Dovecot), bob's node at 1 and at 2 workers"
    )
    pool: dict[int, Burst] = {}
    for workers in () if os.environ.get("BENCH_GROWTH_POOL") == "0" else (1, 2):
        bob.crypto_workers = workers
        _refill(ctx, [(bob, inbox)], sizes[0], alice)
        pool[workers] = _burst(alice, bob, burst, inbox, sent)
    if pool:
        one, two = pool[1], pool[2]
        ctx.compare(
            Stats("delivery, bob at 2 crypto workers", (two.seconds / two.messages,)),
            Stats("1 worker", (one.seconds / one.messages,)),
            extra=f"{two.rate:.1f} vs {one.rate:.1f} msg/s: x{two.rate / one.rate:.2f} "
            f"speed-up from the second worker ({os.cpu_count()} CPUs, shared)",
        )

    ctx.heading(
        f"cost growth: the same burst of {burst} with bob's INBOX and alice's Sent already "
        f"holding {', '.join(f'{n:,}' for n in sizes)} messages (default pool)"
    )
    ctx.note(
        "pre-fill: Maildir files written into cur/ + a doveadm force-resync (both folders), and "
        "the seen-id rows of bob's device.db and inbox.db (see bench/growth.py)"
    )
    bob.crypto_workers = 0
    results: list[Burst] = []
    searches: list[tuple[int, float, float]] = []
    for size in sizes:  # each size's rows are printed as soon as they are measured
        _refill(ctx, [(bob, inbox), (alice, sent)], size, alice)
        r = _burst(alice, bob, burst, inbox, sent)
        results.append(r)
        ref = results[0]
        ctx.compare(
            Stats(f"delivery into {r.mailbox:,}", (r.seconds / r.messages,)),
            Stats(f"into {ref.mailbox:,}", (ref.seconds / ref.messages,)),
            extra=f"{r.rate:.1f} vs {ref.rate:.1f} msg/s (filed in bob's INBOX)",
        )
        ctx.compare(
            Stats(f"alice's Sent copies, {r.mailbox:,}", (r.sent_seconds / max(1, r.sent_filed),)),
            Stats(f"Sent of {ref.mailbox:,}", (ref.sent_seconds / max(1, ref.sent_filed),)),
            extra=f"{r.sent_filed} of {r.messages} filed in {r.sent_seconds:.0f} s (each: a "
            f"search for the client's own copy after {SENT_COPY_WAIT} s, APPEND (\\Seen))",
        )
        searches.append((inbox.have, *_search(bob)))
        count, whole, bounded = searches[-1]
        ctx.compare(
            Stats(f"header search, {count:,}", (whole,)),
            Stats(f"whole folder of {searches[0][0]:,}", (searches[0][1],)),
            extra=f"whole folder (what the filer did); from a UID floor: {fmt_time(bounded)}",
        )
    ref = results[0]
    for r in results:
        ctx.figure(
            f"bob's node RSS, {r.mailbox:,} in mailbox",
            f"peak {fmt_bytes(r.peak)}",
            extra=f"after {fmt_bytes(r.after)}   vs {fmt_bytes(ref.after)} into "
            f"{ref.mailbox:,}: x{r.after / ref.after:.2f}",
        )


def _refill(
    ctx: Context,
    fills: list[tuple[GrowthNode, _Filler]],
    size: int,
    alice: GrowthNode,
) -> None:
    """Stop the nodes, bring their folders to ``size``, start them again (new settings
    too) and have Dovecot sync the folders."""
    for node, _ in fills:
        node.stop()
    started = time.monotonic()
    for _, filler in fills:
        filler.fill_to(size)
    filled = time.monotonic() - started
    for node, _ in fills:
        node.configure(alice if node is not alice else _peer(fills, alice))
        node.start()
    took = 0.0
    for node, filler in fills:
        node.wait_ready()
        took += _index(node, filler.folder, filler.have)
    ctx.note(
        ", ".join(f"{f.node.user}'s {f.folder}: {f.have:,}" for _, f in fills)
        + f" (pre-filled in {filled:.0f} s, Dovecot synced in {took:.1f} s)"
    )


def _peer(fills: list[tuple[GrowthNode, _Filler]], alice: GrowthNode) -> GrowthNode:
    return next(n for n, _ in fills if n is not alice)


# --- the steps ---------------------------------------------------------------------------------


def _introduce(alice: GrowthNode, bob: GrowthNode) -> None:
    """alice writes first (proof of work), bob answers: alice then holds a contact token."""
    _send_all(alice, str(bob.address), [compose(str(alice.address), str(bob.address), -1)])
    _until(lambda: bob.filed() >= 1, "alice's first message")
    _send_all(bob, str(alice.address), [compose(str(bob.address), str(alice.address), -2)])
    _until(lambda: alice.filed() >= 1 and alice.filed("Sent") >= 1, "bob's answer")


def _index(node: GrowthNode, folder: str, expect: int) -> float:
    """Have Dovecot read the folder from disk and check its count.  A force-resync, not just
    a sync: the files were written without Dovecot, which trusts its index about ``cur/``
    (``maildir_very_dirty_syncs``, gateway/dovecot.py ``request_resync``)."""
    started = time.monotonic()
    node.doveadm("force-resync", "-u", node.user, folder)
    took = time.monotonic() - started
    found = node.inbox_messages(folder)
    if found != expect:
        raise RuntimeError(f"{node.user}'s {folder} holds {found} messages, {expect} expected")
    return took


def _search(node: GrowthNode) -> tuple[float, float]:
    """One header search in the INBOX as the filer ran it in Sent (the whole folder), and
    one from a UID floor a few messages back (as it does now)."""
    times = []
    uidnext = int(
        re.findall(
            r"uidnext=(\d+)",
            node.doveadm("mailbox", "status", "-u", node.user, "uidnext", "INBOX"),
        )[0]
    )
    for floor in ([], ["uid", f"{max(1, uidnext - 20)}:*"]):
        started = time.perf_counter()
        node.doveadm(
            "search", "-u", node.user, "mailbox", "INBOX", *floor,
            "header", "Message-ID", "<growth.7@bench>",
        )  # fmt: skip
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def _burst(alice: GrowthNode, bob: GrowthNode, n: int, inbox: _Filler, sent: _Filler) -> Burst:
    to, sender = str(bob.address), str(alice.address)
    messages = [compose(sender, to, i) for i in range(n)]
    before, sent_before = bob.filed(), alice.filed("Sent")
    bob.reset_peak()
    started = time.perf_counter()
    sending = threading.Thread(target=_send_all, args=(alice, to, messages), daemon=True)
    sending.start()
    _until(lambda: bob.filed() >= before + n, f"a burst of {n}", poll=0.05)
    seconds = time.perf_counter() - started
    peak = bob.peak()
    deadline = time.monotonic() + SENT_LIMIT
    while alice.filed("Sent") < sent_before + n and time.monotonic() < deadline:
        time.sleep(0.05)
    sent_seconds = time.perf_counter() - started
    sent_filed = alice.filed("Sent") - sent_before
    sending.join()
    result = Burst(n, inbox.have, seconds, sent_seconds, sent_filed, peak, bob.settle())
    inbox.have += n
    sent.have += n
    return result


def _send_all(node: NodeProcess, to: str, messages: list[bytes]) -> None:
    import smtplib

    def session(part: list[bytes]) -> None:
        with smtplib.SMTP("127.0.0.1", node.smtp, timeout=120) as s:
            s.login(node.user, node.password)
            for m in part:
                s.sendmail(str(node.address), [to], m)

    parts = [messages[i::SESSIONS] for i in range(SESSIONS)]
    with ThreadPoolExecutor(SESSIONS) as pool:
        for f in [pool.submit(session, p) for p in parts if p]:
            f.result()


def _until(check: object, what: str, poll: float = 0.2) -> None:
    assert callable(check)
    deadline = time.monotonic() + FILED_TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not filed within {FILED_TIMEOUT:.0f} s")
        time.sleep(poll)


# --- the pre-fill ------------------------------------------------------------------------------


class _Filler:
    """Brings a stopped node's folder to a size: Maildir files (and, with ``records``, the
    seen-id rows a node keeps for each message it received)."""

    def __init__(self, node: GrowthNode, folder: str, *, records: bool) -> None:
        self.node = node
        self.folder = folder
        self.records = records
        self.have = 0  # messages in the folder
        self.written = 0  # files written so far (their names stay unique)
        body = "A line of a message that was filed before the bench began.\n"
        self.body = body * (FILL_BYTES // len(body))

    def fill_to(self, size: int) -> None:
        """Add messages until the folder holds ``size``."""
        add = size - self.have
        if add <= 0:
            return
        node = self.node
        top = node.dir / "mail" / node.user
        maildir = top if self.folder == "INBOX" else top / f".{self.folder}"
        owner = top.stat()
        for d in (maildir, *(maildir / sub for sub in ("cur", "new", "tmp"))):
            if not d.exists():
                d.mkdir(mode=0o700)
                os.chown(d, owner.st_uid, owner.st_gid)
        cur = maildir / "cur"
        now = int(time.time())
        msg_ids, digests = [], []
        for _ in range(add):
            i = self.written
            self.written += 1
            when = now - 10 * add + 10 * i
            message = (
                f"Return-Path: <>\nX-Onionpost-Filing: {os.urandom(16).hex()}\n"
                f"From: <someone{i % 50}@example.onion>\nTo: <{node.address}>\n"
                f"Subject: filed before {i}\nMessage-ID: <growth.{i}@bench>\n"
                f"Date: {formatdate(when, usegmt=True)}\nMIME-Version: 1.0\n"
                f"Content-Type: text/plain; charset=us-ascii\n\n{self.body}"
            ).encode()
            vsize = len(message) + message.count(b"\n")
            path = cur / f"{when}.M{i}P{os.getpid()}.bench,S={len(message)},W={vsize}:2,S"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, message)
                os.fchown(fd, owner.st_uid, owner.st_gid)
            finally:
                os.close(fd)
            os.utime(path, (when, when))
            msg_ids.append(os.urandom(16))
            digests.append(os.urandom(32))
        os.utime(cur)  # Dovecot notices the new files at its next sync
        self.have = size
        if self.records:
            self._records(msg_ids, digests, now + 4 * 86_400)

    def _records(self, msg_ids: list[bytes], digests: list[bytes], expires: int) -> None:
        node = self.node
        with contextlib.closing(sqlite3.connect(node.dir / "device.db")) as db, db:
            db.executemany(
                "INSERT INTO mailbox_seen_ids (user, msg_id, expires_at) VALUES (?, ?, ?)",
                [(node.user, m, expires) for m in msg_ids],
            )
        with contextlib.closing(sqlite3.connect(node.dir / "inbox.db")) as db, db:
            (mailbox_id,) = db.execute(
                "SELECT mailbox_id FROM mailboxes WHERE local = ?", (node.user,)
            ).fetchone()
            db.executemany(
                "INSERT INTO seen_digests (mailbox_id, digest, expires_at) VALUES (?, ?, ?)",
                [(mailbox_id, d, expires) for d in digests],
            )
