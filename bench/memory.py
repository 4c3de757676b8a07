"""Memory of a node: a large message through the whole path, and a node with a full mailbox.

**Large messages.**  Two real ``onionpost run`` processes (alice's node and bob's, tor off,
each other's inbox on a static loopback route, as ``tests/integration/test_crash_safety.py``
runs them).  A message of 1, 25 and 50 MiB (a base64 attachment, as a mail client sends
one) goes the way a mail client's does: SMTP submission to alice's gateway with smtplib,
stored, sealed, handed to alice's outbox, delivered to bob's inbox (``POST /v1/deliver``),
accepted and spooled there, fetched by bob's device, opened, verified and filed.  The bench
waits until bob's INBOX holds it (IMAP STATUS, a few bytes per poll).

For each node process, read from ``/proc/<pid>/status`` (the nodes are separate processes,
so neither the client nor the other node is counted):

* *peak*: ``VmHWM``, the resident-set high-water mark, reset (``clear_refs``) just before
  the message is submitted, so it is the peak of this message alone;
* *after*: ``VmRSS`` once the message is filed and the node has been idle for a few seconds.

The reference is the same node idle before the first message (its resident set with
nothing to do), so ``peak - idle`` is what the message cost, printed also as a multiple of
the message size.  The goal (the hardening issue): peak under 150 MB and back under 100 MB
afterwards for 50 MiB, on a machine with 1 GB (a Raspberry Pi).

**A full mailbox.**  bob's device holds 100,000 small messages (filed into its store before
the node starts, in one transaction); the node is started, left idle, and its resident set
is printed next to the idle node with an empty mailbox.  Goal: under 80 MiB (tor excluded:
tor is off here).
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

from bench.harness import Context, fmt_bytes
from onionpost.testing.ports import free_port

MiB = 1 << 20
MB = 10**6
SIZES_MIB = (1, 25, 50)
QUICK_SIZES_MIB = (1, 8)
MAILBOX_MESSAGES = 100_000
QUICK_MAILBOX_MESSAGES = 5_000
STARTUP_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 600.0
SETTLE_SECONDS = 5.0
REPO = Path(__file__).resolve().parents[1]


def run(ctx: Context) -> None:
    sizes = QUICK_SIZES_MIB if ctx.quick else SIZES_MIB
    with _passable_tmp() as d:
        _large_messages(ctx, d, sizes)
    n = QUICK_MAILBOX_MESSAGES if ctx.quick else MAILBOX_MESSAGES
    with _passable_tmp() as d:
        _full_mailbox(ctx, d, n)


@contextlib.contextmanager
def _passable_tmp() -> Iterator[Path]:
    """A temporary directory other accounts may pass through: a node run as root runs its
    Dovecot's mail processes as another account (as ``tests/conftest.py::mail_tmp``)."""
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-mem-", dir="/tmp") as d:
        root = Path(d)
        root.chmod(0o755)
        yield root


# --- the node processes -----------------------------------------------------------------------


class NodeProcess:
    """``onionpost run`` for one user in its own data directory, tor off."""

    def __init__(self, root: Path, user: str) -> None:
        from gateway.setup import setup_account
        from onionpost.app.provision import initialize
        from onionpost.base.config import load

        self.user = user
        self.dir = root / user
        self.dir.mkdir(mode=0o700)
        self.api, self.smtp, self.imap, self.auto = (free_port() for _ in range(4))
        result = initialize(
            load(self.dir),
            local=user,
            device_name="bench",
            now=int(time.time()),
            gateway_setup=setup_account,
        )
        assert result.password is not None
        self.address = result.address
        self.password = result.password
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"{user}.log"

    def configure(self, peer: NodeProcess | None) -> None:
        routes = (
            f'static_routes = {{ "{peer.address.onion}" = "127.0.0.1:{peer.api}" }}\n'
            if peer is not None
            else ""
        )
        (self.dir / "onionpost.toml").write_text(
            '[tor]\nmode = "off"\n'
            + routes
            + f"[inbox]\nlisten_port = {self.api}\npow_bits = 4\nlongpoll_seconds = 2.0\n"
            f"[gateway]\nsmtp_port = {self.smtp}\nimap_port = {self.imap}\n"
            f"autoconfig_port = {self.auto}\n"
            "[delivery]\nretry_min_seconds = 1\nretry_max_seconds = 2\n",
            encoding="utf-8",
        )

    def start(self) -> None:
        env = {**os.environ, "ONIONPOST_HOME": str(self.dir)}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "onionpost", "run"],
                env=env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        for port in (self.api, self.smtp, self.imap):
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.user}'s node exited:\n{self._tail()}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{self.user}'s node did not open port {port}:\n{self._tail()}"
                        ) from None
                    time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
        except OSError:
            return ""

    # -- memory, from outside ------------------------------------------------------------

    def _status(self, field: str) -> int:
        assert self.proc is not None
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
        if m is None:
            raise RuntimeError(f"/proc/{self.proc.pid}/status has no {field}")
        return int(m.group(1)) * 1024

    def rss(self) -> int:
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        assert self.proc is not None
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def settle(self) -> int:
        """RSS once the node has been idle a while (the smallest of a few readings)."""
        readings = []
        for _ in range(int(SETTLE_SECONDS / 0.5)):
            time.sleep(0.5)
            readings.append(self.rss())
        return min(readings[-3:])

    # -- mail ----------------------------------------------------------------------------

    def inbox_count(self) -> int:
        with imaplib.IMAP4("127.0.0.1", self.imap, timeout=30) as imap:
            imap.login(self.user, self.password)
            typ, data = imap.status("INBOX", "(MESSAGES)")
            assert typ == "OK", data
            raw = data[0]
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            m = re.search(r"MESSAGES (\d+)", text)
            return int(m.group(1)) if m else 0


@contextlib.contextmanager
def nodes(root: Path, *users: str) -> Iterator[list[NodeProcess]]:
    made = [NodeProcess(root, u) for u in users]
    for i, n in enumerate(made):
        n.configure(made[1 - i] if len(made) == 2 else None)
    try:
        for n in made:
            n.start()
        for n in made:
            n.wait_ready()
        yield made
    finally:
        for n in made:
            n.stop()


def attachment_message(sender: str, to: str, size: int, n: int) -> bytes:
    """A multipart message of about ``size`` bytes: a short text and a base64 attachment."""
    boundary = f"bench-{os.urandom(8).hex()}"
    head = (
        f"From: {sender}\r\nTo: {to}\r\nSubject: memory {n}\r\n"
        f"Message-ID: <memory.{n}.{os.urandom(6).hex()}@bench>\r\n"
        f"Date: {formatdate(usegmt=True)}\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\n'
        f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        "An attachment for the memory benchmark.\r\n"
        f"--{boundary}\r\nContent-Type: application/octet-stream\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="blob-{n}.bin"\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    room = size - len(head) - len(tail)
    # base64 lines of 76 characters + CRLF: 78 bytes carry 57 raw bytes
    raw = os.urandom(room // 78 * 57)
    return head + base64.encodebytes(raw).replace(b"\n", b"\r\n") + tail


def _send(node: NodeProcess, to: str, message: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", node.smtp, timeout=300) as s:
        s.login(node.user, node.password)
        s.sendmail(str(node.address), [to], message)


# --- large messages ---------------------------------------------------------------------------


def _large_messages(ctx: Context, root: Path, sizes: tuple[int, ...]) -> None:
    ctx.heading(
        "a large message through the whole path: SMTP -> seal -> deliver -> accept -> open -> "
        "file (two `onionpost run` processes, tor off; peak = VmHWM, after = VmRSS idle)"
    )
    with nodes(root, "alice", "bob") as (alice, bob):
        idle = {"alice": alice.settle(), "bob": bob.settle()}
        ctx.figure("reference: idle node (alice)", fmt_bytes(idle["alice"]))
        ctx.figure("reference: idle node (bob)", fmt_bytes(idle["bob"]))
        filed = bob.inbox_count()
        for n, mib in enumerate(sizes):
            message = attachment_message(str(alice.address), str(bob.address), mib * MiB, n)
            for node in (alice, bob):
                node.reset_peak()
            started = time.monotonic()
            _send(alice, str(bob.address), message)
            accepted = time.monotonic() - started
            del message
            deadline = time.monotonic() + DELIVERY_TIMEOUT
            while bob.inbox_count() <= filed:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {mib} MiB message was not filed in time")
                time.sleep(0.5)
            took = time.monotonic() - started
            filed += 1
            peaks = {"alice": alice.peak(), "bob": bob.peak()}
            after = {"alice": alice.settle(), "bob": bob.settle()}
            for node, role in ((alice, "sender: SMTP, seal, deliver"), (bob, "receiver")):
                cost = peaks[node.user] - idle[node.user]
                ctx.figure(
                    f"{mib:>2} MiB {node.user} ({role.split(':')[0]}) peak",
                    f"{peaks[node.user] / MB:6.0f} MB",
                    extra=f"idle + {cost / MB:5.0f} MB ({cost / (mib * MiB):4.1f}x message)   "
                    f"after {after[node.user] / MB:4.0f} MB",
                )
            ctx.note(f"{mib} MiB: 250 after {accepted:.1f} s, filed after {took:.1f} s")
    ctx.note(
        "goal: peak < 150 MB and after < 100 MB for 50 MiB (1 GB Raspberry Pi); 1 MB = 10^6 bytes"
    )


# --- a full mailbox ---------------------------------------------------------------------------


def _fill(node: NodeProcess, count: int) -> None:
    """Write the INBOX as Dovecot's Maildir files directly (LF line ends, ``S=`` size, seen),
    before the node starts: filing 100,000 messages through LMTP is not what is measured."""
    cur = node.dir / "mail" / node.user / "cur"
    for sub in ("cur", "new", "tmp"):
        (cur.parent / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    now = int(time.time())
    body = "A line of a short message in a full mailbox.\n" * 20
    for i in range(count):
        when = now - count + i
        message = (
            f"From: <someone{i % 50}@example.onion>\nTo: <{node.address}>\n"
            f"Subject: message {i}\nMessage-ID: <full.{i}@bench>\n"
            f"Date: {formatdate(when, usegmt=True)}\n\n{body}"
        ).encode()
        path = cur / f"{when}.M{i}P0.bench,S={len(message)}:2,S"
        path.write_bytes(message)
        os.utime(path, (when, when))


def _full_mailbox(ctx: Context, root: Path, count: int) -> None:
    ctx.heading(f"an idle node whose mailbox holds {count:,} messages (tor off)")
    empty = NodeProcess(root, "empty")
    full = NodeProcess(root, "full")
    started = time.monotonic()
    _fill(full, count)
    ctx.note(f"filled {count:,} messages in {time.monotonic() - started:.0f} s")
    results = {}
    for node in (empty, full):
        node.configure(None)
        node.start()
        try:
            node.wait_ready()
            results[node.user] = node.settle()
            if node is full:
                assert node.inbox_count() == count
                node.reset_peak()
                results["selected"] = node.settle()
        finally:
            node.stop()
    ctx.figure("reference: idle node, empty mailbox", fmt_bytes(results["empty"]))
    ctx.figure(
        f"idle node, {count:,} messages",
        fmt_bytes(results["full"]),
        extra=f"x{results['full'] / results['empty']:.2f}   after IMAP STATUS "
        f"{fmt_bytes(results['selected'])}   goal < 80 MiB",
    )
