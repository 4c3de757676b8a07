"""Mail-client gateway: SMTP submission and IMAP first sync, against Postfix and Dovecot.

Every server is a separate process tree on 127.0.0.1 and every client is the same code in
this process, so the three servers are measured the same way:

* **onionpost**: ``onionpost run`` on a fresh data directory (``onionpost.app.provision``: alice,
  whose mail client logs in, and bob, a second user of the same node), tor mode "off".
  SMTP is alice mailing bob: each 250 comes after the SQLite transaction
  (``synchronous=FULL``) that queues the message and alice's Sent copy has committed
  (``Submissions.submit_async``: concurrent submissions share a commit, a group commit),
  and meanwhile the node seals, hands over and files the accepted mail in the same event
  loop, as it always does.  For the run, the inbox's stranger proof of work is 0 bits and
  its hourly rate limits are open, so the background work is the steady state between
  contacts rather than minting stamps (the crypto section measures those).
* **Postfix** (reference for SMTP): a private instance (its own ``config_directory``,
  ``queue_directory`` and ``data_directory`` in a temporary directory, master started
  directly as a child of this process, no chroot), smtpd on a free 127.0.0.1 port,
  ``default_transport = discard`` (nothing is local: ``mydestination`` is empty, 127.0.0.0/8
  may relay).  smtpd answers 250 once cleanup has written and fsync'ed the queue file.
  Postfix is also driven by its own C load generator ``smtp-source``, to show what the Python
  client can and cannot push.
* **Dovecot** (reference for IMAP): a private stock instance (``dovecot -F -c``, base and
  state directories in the temporary directory, Debian's defaults otherwise) with a
  passwd-file user whose INBOX is filed exactly as onionpost's is: the same messages through
  LMTP with the same client, one session each, stored as the same bytes (no Received or
  Delivered-To header added, as onionpost's LMTP adds none).  Filling it any other way is not
  a comparison: LMTP leaves mail in new/ and a stock Dovecot's first SELECT renames all of it
  into cur/ (docs/performance.md, IMAP), so a reference whose files were written straight
  into cur/ skips work that onionpost's mailbox must do somewhere.

The SMTP client is a small asyncio one (no pipelining, like smtp-source): 10 sessions, each
logged in once (AUTH PLAIN to onionpost; Postfix has no SASL here and relays for loopback),
then MAIL/RCPT/DATA in a loop; latency is MAIL FROM to the 250 after the final dot.  The load
runs in rounds, the node's and Postfix's alternating (:data:`SMTP_ROUNDS`), each once the other
server is done with the last round's mail.  The IMAP
client is imaplib, a fresh session per pass: SELECT, ``UID FETCH 1:* (UID FLAGS RFC822.SIZE
ENVELOPE)`` (Thunderbird's first sync of a folder) and ``FETCH 1:* (BODY.PEEK[HEADER])``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import imaplib
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

from bench.harness import Context, Stats, fmt_bytes, fmt_time

KiB = 1 << 10
MESSAGE_BYTES = 4 * KiB
SESSIONS = 10
HOST = "127.0.0.1"
#: Per session, before the clock starts: TCP, greeting, EHLO, AUTH and this many messages.
SMTP_WARMUP = 3
#: The SMTP load runs in this many rounds, onionpost's and Postfix's alternating in the order
#: O P P O O P P O: on a shared VM whose speed drifts by +-30 % within minutes, one run of each
#: compared two different machines.  The ratio is of the totals; each round's is printed too.
SMTP_ROUNDS = 4
SMTP_WARMUP_ROUND = 300
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: How to install the references (the section starts private instances; "No configuration"
#: keeps Debian from setting up a system MTA on port 25; Dovecot's service is not needed).
APT = (
    "echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections"
    " && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix"
    " dovecot-imapd"
)
REPO = Path(__file__).resolve().parents[1]
_FETCH_START = re.compile(rb"^\d+ \(")


@dataclass(frozen=True)
class Sizes:
    smtp_messages: int
    folder: int
    imap_passes: int  # warm passes after the cold one


def run(ctx: Context) -> None:
    sizes = (
        Sizes(smtp_messages=200, folder=500, imap_passes=1)
        if ctx.quick
        else Sizes(smtp_messages=6000, folder=10_000, imap_passes=3)
    )
    refs = References.find(quick=ctx.quick)
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-gw-") as d:
        root = Path(d)
        root.chmod(0o755)  # Postfix and Dovecot run their workers as other users
        mails = [folder_message(i, sizes.folder) for i in range(sizes.folder)]
        with postfix_server(root / "postfix", refs) as postfix:
            onion = _measure_onionpost(root / "node", mails, sizes, postfix)
        dovecot = _measure_dovecot(root / "dovecot", mails, sizes, refs) if refs.dovecot else None
    report_smtp(ctx, sizes, onion.smtp, refs)
    _report_imap(ctx, sizes, onion.imap, dovecot.imap if dovecot else None, refs)
    ctx.heading(
        f"Filing through LMTP: {sizes.folder:,} messages of {fmt_bytes(MESSAGE_BYTES)} into the "
        "node's Dovecot, one session each, each after Dovecot's 250 (fsynced)"
    )
    per = Stats("onionpost's Dovecot, per message", (onion.filing_seconds / sizes.folder,))
    rate = f"{sizes.folder / onion.filing_seconds:.0f} msg/s"
    if dovecot is None:
        ctx.figure(per.name, fmt_time(per.p50), extra=rate)
    else:
        ctx.compare(
            per,
            Stats(f"Dovecot {refs.dovecot}", (dovecot.filing_seconds / sizes.folder,)),
            extra=f"{rate} vs {sizes.folder / dovecot.filing_seconds:.0f} msg/s",
        )
    ctx.figure(
        "node moved new/ to cur/ within",
        fmt_time(onion.tidy_seconds),
        extra="after the last 250 (DovecotServer.tidy_new_mail, every "
        f"{onion.tidy_interval:.0f} s); the cold pass starts after it",
    )


# --- what is installed ------------------------------------------------------------------------


def which(name: str) -> str | None:
    """A program's path; also looks in the sbin directories, which a user's PATH may lack."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


@dataclass
class References:
    """Which reference servers this run can start, with their programs and versions."""

    postfix: str | None = None  # version, when usable
    postconf: str = "postconf"
    postfix_cmd: str = "postfix"
    smtp_source: str | None = None
    dovecot: str | None = None  # version, when usable
    dovecot_cmd: str = "dovecot"
    why_not: dict[str, str] = field(default_factory=dict)

    @classmethod
    def find(cls, *, quick: bool) -> References:
        refs = cls()
        if quick:
            refs.why_not["postfix"] = refs.why_not["dovecot"] = (
                "not run in --quick mode (a full `python -m bench --only gateway` measures it)"
            )
            return refs
        root = os.geteuid() == 0
        postconf, postfix, dovecot = which("postconf"), which("postfix"), which("dovecot")
        if postconf is None or postfix is None:
            refs.why_not["postfix"] = f"Postfix is not installed; as root: {APT}"
        elif not root:
            refs.why_not["postfix"] = "a private Postfix master must be started as root"
        else:
            refs.postconf, refs.postfix_cmd = postconf, postfix
            refs.postfix = _output([postconf, "-d", "-h", "mail_version"])
            refs.smtp_source = which("smtp-source")
        if dovecot is None:
            refs.why_not["dovecot"] = f"Dovecot is not installed; as root: {APT}"
        elif not root:
            refs.why_not["dovecot"] = "a private Dovecot must be started as root"
        else:
            refs.dovecot_cmd = dovecot
            refs.dovecot = _output([dovecot, "--version"]).split()[0]
        return refs


def _output(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


# --- messages ---------------------------------------------------------------------------------


def _exactly(head: str, size: int) -> bytes:
    """``head`` (CRLF header block with its blank line) and a hex body, ``size`` bytes in all."""
    data = head.encode("ascii")
    left = size - len(data)
    line = (os.urandom(36).hex() + "\r\n").encode()  # 74 bytes, no leading dot
    body = (line * (left // len(line) + 1))[: left - 2] + b"\r\n"
    msg = data + body
    assert len(msg) == size
    return msg


def folder_message(i: int, total: int) -> tuple[int, bytes]:
    """(internal date, message) number ``i`` of the IMAP folder: different senders, subjects
    and dates, so no two ENVELOPEs are alike."""
    when = 1_700_000_000 + (i - total) * 600
    sender = f"s{i % 97:02d}{'q' * 53}.onion"
    head = (
        f"From: Sender {i % 97} <writer{i % 13}@{sender}>\r\n"
        f"To: Alice <alice@{'a' * 56}.onion>\r\n"
        f"Subject: folder message {i} about item {i * 7919 % 10007}\r\n"
        f"Date: {formatdate(when, usegmt=True)}\r\n"
        f"Message-ID: <folder.{i}.{os.urandom(4).hex()}@{sender}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    return when, _exactly(head, MESSAGE_BYTES)


def submission(sender: str, to: str, n: int) -> bytes:
    head = (
        f"From: Alice <{sender}>\r\nTo: Bob <{to}>\r\nSubject: submission {n}\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: <submit.{n}.{os.urandom(6).hex()}@bench>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    )
    return _exactly(head, MESSAGE_BYTES)


def dot_stuffed(message: bytes) -> bytes:
    """The DATA payload: leading dots doubled, then the terminating dot line."""
    stuffed = re.sub(rb"(?m)^\.", b"..", message)
    return stuffed + b".\r\n"


# --- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_ports(ports: list[int], proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    waiting = list(ports)
    while waiting:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start-up{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not listen on {HOST}:{waiting[0]} in {STARTUP_TIMEOUT:.0f} s"
                + _tail(log)
            )
        try:
            with socket.create_connection((HOST, waiting[0]), timeout=1):
                waiting.pop(0)
        except OSError:
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to this one PID (every server here stops its own children on SIGTERM)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(log: Path, lines: int = 15) -> str:
    if not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "; last lines of its log:\n" + "\n".join(text)


@contextlib.contextmanager
def running(
    cmd: list[str], ports: list[int], what: str, log: Path, **kw: Any
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server, wait until it listens on every port, and stop it (by its PID)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, **kw
        )
    try:
        wait_for_ports(ports, proc, what, log)
        yield proc
    finally:
        stop_process(proc)


# --- the SMTP client --------------------------------------------------------------------------


class SmtpError(RuntimeError):
    pass


class SmtpSession:
    """One client connection: greeting, EHLO, optional AUTH PLAIN, then transactions."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, login: tuple[str, str] | None) -> SmtpSession:
        reader, writer = await asyncio.open_connection(HOST, port)
        s = cls(reader, writer)
        await s.expect(220)
        await s.command(b"EHLO bench.invalid", 250)
        if login is not None:
            token = base64.b64encode(f"\0{login[0]}\0{login[1]}".encode()).decode()
            await s.command(f"AUTH PLAIN {token}".encode(), 235)
        return s

    async def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError("the server closed the connection")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    async def expect(self, code: int) -> bytes:
        got, text = await self.reply()
        if got != code:
            raise SmtpError(f"expected {code}, got {text.decode(errors='replace').strip()}")
        return text

    async def command(self, line: bytes, code: int) -> bytes:
        self.writer.write(line + b"\r\n")
        return await self.expect(code)

    async def send(self, sender: str, rcpt: str, payload: bytes) -> float:
        """One transaction; returns seconds from MAIL FROM to the 250 after the data."""
        t0 = time.perf_counter()
        await self.command(f"MAIL FROM:<{sender}>".encode(), 250)
        await self.command(f"RCPT TO:<{rcpt}>".encode(), 250)
        await self.command(b"DATA", 354)
        self.writer.write(payload)
        await self.expect(250)
        return time.perf_counter() - t0

    async def close(self) -> None:
        with contextlib.suppress(SmtpError, OSError):
            await self.command(b"QUIT", 221)
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass(frozen=True)
class SmtpResult:
    messages: int
    seconds: float  # wall time, first MAIL FROM to the last 250
    latencies: tuple[float, ...]
    client_cpu: float  # CPU seconds this process spent as the client in that window
    # CPU seconds of the server process (all its threads) in that window, and until it had
    # finished the background work for those messages too (None: not measured).
    server_cpu: float | None = None
    server_cpu_settled: float | None = None
    # CPU seconds of the node's SMTP front process in the timed window (None: none runs).
    front_cpu: float | None = None

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def per_message(self, name: str) -> Stats:
        return Stats(name, (self.seconds / self.messages,))

    def latency(self, name: str) -> Stats:
        return Stats(name, self.latencies)

    @classmethod
    def merged(cls, rounds: Sequence[SmtpResult]) -> SmtpResult:
        """The rounds as one run: their messages, wall times and CPU added up."""

        def total(values: Sequence[float | None]) -> float | None:
            return None if any(v is None for v in values) else sum(v or 0.0 for v in values)

        return cls(
            sum(r.messages for r in rounds),
            sum(r.seconds for r in rounds),
            tuple(x for r in rounds for x in r.latencies),
            sum(r.client_cpu for r in rounds),
            total([r.server_cpu for r in rounds]),
            total([r.server_cpu_settled for r in rounds]),
            total([r.front_cpu for r in rounds]),
        )


@dataclass(frozen=True)
class SmtpComparison:
    """onionpost's and Postfix's rounds (none for Postfix when it is not installed)."""

    onion: list[SmtpResult]
    postfix: list[SmtpResult]
    smtp_source: float | None = None  # seconds for Postfix to take the same load from smtp-source


async def smtp_load(
    port: int,
    *,
    login: tuple[str, str] | None,
    sender: str,
    rcpt: str,
    messages: int,
    sessions: int = SESSIONS,
    server_pid: int | None = None,
) -> SmtpResult:
    """``sessions`` concurrent sessions share ``messages`` transactions (after a warm-up)."""
    warm = [dot_stuffed(submission(sender, rcpt, -1 - i)) for i in range(sessions * SMTP_WARMUP)]
    timed = [dot_stuffed(submission(sender, rcpt, i)) for i in range(messages)]
    conns = await asyncio.gather(*(SmtpSession.open(port, login) for _ in range(sessions)))
    try:
        for i in range(SMTP_WARMUP):
            await asyncio.gather(
                *(c.send(sender, rcpt, warm[i * sessions + k]) for k, c in enumerate(conns))
            )
        shares = [timed[k::sessions] for k in range(sessions)]

        async def drive(conn: SmtpSession, payloads: list[bytes]) -> list[float]:
            return [await conn.send(sender, rcpt, p) for p in payloads]

        front_pid = smtp_front_pid(server_pid) if server_pid else None
        front0 = process_cpu(front_pid) if front_pid else 0.0
        server0 = process_cpu(server_pid) if server_pid else 0.0
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await asyncio.gather(*(drive(c, s) for c, s in zip(conns, shares, strict=True)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        server = process_cpu(server_pid) - server0 if server_pid else None
        front = process_cpu(front_pid) - front0 if front_pid else None
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    settled = await _settled_cpu(server_pid) - server0 if server_pid else None
    latencies = tuple(x for r in results for x in r)
    return SmtpResult(messages, wall, latencies, cpu, server, settled, front)


def _stat(pid: int | str) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first, so the
    parent is ``[1]``, user and system CPU ``[11]`` and ``[12]``, those of the children
    waited for ``[13]`` and ``[14]``)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _parents() -> dict[int, list[int]]:
    """Every process's children, by parent pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            children.setdefault(int(_stat(entry.name)[1]), []).append(int(entry.name))
        except OSError:  # it ended meanwhile
            continue
    return children


def smtp_front_pid(node_pid: int) -> int | None:
    """The node's SMTP front process (gateway/smtpfront.py), if it runs one."""
    for pid in _parents().get(node_pid, []):
        try:
            if b"gateway.smtpfront" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used, from /proc."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and of every process under it (the node's SMTP front, its
    Dovecot and Dovecot's children), those that ended and were waited for included."""
    children = _parents()
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = _stat(p)
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        todo.extend(children.get(p, []))
    return total


async def _settled_cpu(pid: int, quiet: float = 0.02, timeout: float = 120.0) -> float:
    """The process's CPU seconds once it is done with what the load gave it: the first
    half second in which it and the processes under it (its Dovecot: filing goes on there)
    used less than ``quiet`` seconds of CPU."""
    deadline = time.perf_counter() + timeout
    last = tree_cpu(pid)
    while time.perf_counter() < deadline:
        await asyncio.sleep(0.5)
        now = tree_cpu(pid)
        if now - last < quiet:
            break
        last = now
    return process_cpu(pid)


def percentile(values: tuple[float, ...], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p * (len(s) - 1)))]


# --- the IMAP client --------------------------------------------------------------------------


@dataclass(frozen=True)
class ImapPass:
    """Seconds (wall, and this process's CPU) per step of one fresh session."""

    wall: dict[str, float]
    cpu: dict[str, float]
    header_bytes: int


def _fetched(data: list[object]) -> tuple[int, int]:
    """(number of FETCH responses, bytes of literals) in imaplib's answer."""
    count = literal = 0
    for item in data:
        first = item[0] if isinstance(item, tuple) else item
        if isinstance(first, bytes) and _FETCH_START.match(first):
            count += 1
        if isinstance(item, tuple) and isinstance(item[1], bytes):
            literal += len(item[1])
    return count, literal


IMAP_STEPS: dict[str, tuple[str, str, str]] = {
    # step: (label, imaplib method, its arguments)
    "select": ("SELECT INBOX", "select", "INBOX"),
    "envelopes": (
        "UID FETCH 1:* (...ENVELOPE)",
        "uid",
        "FETCH 1:* (UID FLAGS RFC822.SIZE ENVELOPE)",
    ),
    "headers": ("FETCH 1:* (BODY.PEEK[HEADER])", "fetch", "1:* (BODY.PEEK[HEADER])"),
}


def imap_pass(port: int, user: str, password: str, expected: int) -> ImapPass:
    """One fresh session: LOGIN (not timed), then each of :data:`IMAP_STEPS`, checked."""
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    header_bytes = 0
    conn = imaplib.IMAP4(HOST, port)
    try:
        conn.login(user, password)
        for step, (_label, method, args) in IMAP_STEPS.items():
            call: Any = getattr(conn, method)
            c0, t0 = time.process_time(), time.perf_counter()
            typ, data = call(*args.split(" ", 1))
            wall[step], cpu[step] = time.perf_counter() - t0, time.process_time() - c0
            if typ != "OK":
                raise RuntimeError(f"IMAP {step} failed: {data!r}")
            if step == "select":
                if int(data[0]) != expected:
                    raise RuntimeError(f"SELECT found {data[0]!r} messages, not {expected}")
                continue
            count, literal = _fetched(data)
            if count != expected:
                raise RuntimeError(f"{step}: {count} FETCH responses, not {expected}")
            if step == "headers":
                header_bytes = literal
    finally:
        with contextlib.suppress(imaplib.IMAP4.error, OSError):
            conn.logout()
    return ImapPass(wall, cpu, header_bytes)


@dataclass(frozen=True)
class ImapResult:
    cold: ImapPass
    warm: list[ImapPass]

    def stats(self, step: str, name: str, *, cold: bool = False) -> Stats:
        passes = [self.cold] if cold else self.warm
        return Stats(name, tuple(p.wall[step] for p in passes))

    def total(self, *, cold: bool = False) -> float:
        """All steps of a pass: the cold pass, or the median warm one step by step."""
        passes = [self.cold] if cold else self.warm
        return sum(statistics.median(p.wall[s] for p in passes) for s in IMAP_STEPS)

    def client_cpu(self, step: str, *, cold: bool = False) -> float:
        passes = [self.cold] if cold else self.warm
        return statistics.median(p.cpu[step] for p in passes)


def imap_run(port: int, user: str, password: str, expected: int, passes: int) -> ImapResult:
    cold = imap_pass(port, user, password, expected)
    return ImapResult(cold, [imap_pass(port, user, password, expected) for _ in range(passes)])


# --- onionpost --------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnionpostResult:
    smtp: SmtpComparison
    imap: ImapResult
    filing_seconds: float  # the whole INBOX filed through the node's Dovecot LMTP
    tidy_seconds: float  # from the last 250 until the node had the INBOX's new/ emptied
    tidy_interval: float


@dataclass(frozen=True)
class _Node:
    """A running ``onionpost run`` of :func:`onionpost_node`: its ports and its users."""

    data_dir: Path
    smtp_port: int
    imap_port: int
    alice: Any  # onionpost.app.provision's result: address and password
    bob: Any
    pid: int


@contextlib.contextmanager
def onionpost_node(data_dir: Path) -> Iterator[_Node]:
    """``onionpost run`` on a fresh data directory with alice and bob, stopped on exit."""
    from gateway.setup import setup_account
    from onionpost.app.provision import add_user, initialize
    from onionpost.base.config import load

    data_dir.mkdir(mode=0o700)
    smtp_port, imap_port, autoconfig_port = free_port(), free_port(), free_port()
    (data_dir / "onionpost.toml").write_text(
        '[tor]\nmode = "off"\n\n'
        f"[gateway]\nsmtp_port = {smtp_port}\nimap_port = {imap_port}\n"
        f"autoconfig_port = {autoconfig_port}\n"
        # A Sent copy waits for the client's own (60 s by default) and is filed only if the
        # client saved none; this client saves none, so the node would file a round's copies
        # a minute later, in whichever round (its own or Postfix's) runs then.  They wait past
        # the run instead: the rounds measure accepting mail and the work that follows at
        # once (sealing, delivery, filing bob's copy), not a Sent folder the client skipped.
        "sent_copy_wait_seconds = 86400\n\n"
        "[inbox]\npow_bits = 0\nrate_per_mailbox_per_hour = 100000000\n"
        "rate_per_source_per_hour = 100000000\n"
        "rate_strangers_per_mailbox_per_hour = 100000000\nrate_strangers_per_hour = 100000000\n",
        encoding="utf-8",
    )
    config = load(data_dir)
    now = int(time.time())
    alice = initialize(
        config, local="alice", device_name="bench", now=now, gateway_setup=setup_account
    )
    bob = add_user(config, local="bob", device_name="bench", now=now)
    assert alice.password is not None
    cmd = [sys.executable, "-m", "onionpost", "--data-dir", str(data_dir), "run"]
    log = data_dir.parent / "onionpost-node.log"
    with running(cmd, [smtp_port, imap_port], "onionpost run", log, cwd=REPO) as proc:
        yield _Node(data_dir, smtp_port, imap_port, alice, bob, proc.pid)


def onionpost_smtp(node: _Node, messages: int) -> SmtpResult:
    """The SMTP load against a running node: alice mails bob."""
    return asyncio.run(
        smtp_load(
            node.smtp_port,
            login=("alice", node.alice.password),
            sender=str(node.alice.address),
            rcpt=str(node.bob.address),
            messages=messages,
            server_pid=node.pid,
        )
    )


def compare_smtp(node: _Node, postfix: _Postfix | None, messages: int) -> SmtpComparison:
    """The same SMTP load against the node and Postfix, in :data:`SMTP_ROUNDS` alternating
    rounds after an untimed one of :data:`SMTP_WARMUP_ROUND` messages each (Postfix's first
    rounds were its slowest: processes and queue files still to make).  Each round starts once
    the other server is done with the previous one's mail (the node has sealed, delivered and
    filed it; Postfix has discarded it)."""
    rounds = SMTP_ROUNDS if messages >= 100 * SMTP_ROUNDS else 1
    onion: list[SmtpResult] = []
    ref: list[SmtpResult] = []
    loads: list[tuple[Callable[[int], SmtpResult], list[SmtpResult]]] = [
        (functools.partial(onionpost_smtp, node), onion)
    ]
    if postfix is not None:
        loads.append((functools.partial(postfix_smtp, postfix), ref))
    if rounds > 1:
        for load, _ in loads:
            load(SMTP_WARMUP_ROUND)
    for i in range(rounds):
        for load, into in loads if i % 2 == 0 else reversed(loads):
            into.append(load(messages // rounds))
    smtp_source = postfix_smtp_source(postfix, messages) if postfix is not None else None
    return SmtpComparison(onion, ref, smtp_source)


def _measure_onionpost(
    data_dir: Path, mails: list[tuple[int, bytes]], sizes: Sizes, postfix: _Postfix | None
) -> OnionpostResult:
    from gateway.dovecot import DovecotServer, Layout

    with onionpost_node(data_dir) as node:
        layout = Layout(data_dir)
        filing = asyncio.run(_file_through_lmtp(layout.lmtp_socket, "alice", mails))
        tidy = _wait_until_tidy(layout.maildir("alice") / "new")
        imap = imap_run(node.imap_port, "alice", node.alice.password, len(mails), sizes.imap_passes)
        smtp = compare_smtp(node, postfix, sizes.smtp_messages)
    return OnionpostResult(smtp, imap, filing, tidy, DovecotServer.TIDY_INTERVAL)


async def _file_through_lmtp(socket_path: Path, user: str, mails: list[tuple[int, bytes]]) -> float:
    """File the INBOX the way the node files mail from others: one LMTP session each, each
    returning after Dovecot's 250 (Dovecot fsyncs first)."""
    from gateway.dovecot import lmtp_deliver

    start = time.perf_counter()
    for _when, message in mails:
        await lmtp_deliver(socket_path, user, message)
    return time.perf_counter() - start


def _wait_until_tidy(new: Path, timeout: float = 120.0) -> float:
    """Seconds until the node has had Dovecot move the filed mail out of ``new``, down to
    fewer than the ``TIDY_AT`` it leaves for the next SELECT: the state a client finds a few
    seconds after mail stops arriving.  Past ``timeout`` the cold pass runs anyway (and shows
    the cost of the renames)."""
    from gateway.dovecot import TIDY_AT

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        with os.scandir(new) as entries:
            if sum(1 for _ in zip(entries, range(TIDY_AT), strict=False)) < TIDY_AT:
                break
        time.sleep(0.05)
    return time.perf_counter() - start


# --- Postfix ----------------------------------------------------------------------------------

_POSTFIX_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n  -  n  60    1  pickup
cleanup   unix  n  -  n  -     0  cleanup
qmgr      unix  n  -  n  300   1  qmgr
rewrite   unix  -  -  n  -     -  trivial-rewrite
bounce    unix  -  -  n  -     0  bounce
defer     unix  -  -  n  -     0  bounce
trace     unix  -  -  n  -     0  bounce
verify    unix  -  -  n  -     1  verify
flush     unix  n  -  n  1000? 0  flush
proxymap  unix  -  -  n  -     -  proxymap
proxywrite unix -  -  n  -     1  proxymap
showq     unix  n  -  n  -     -  showq
error     unix  -  -  n  -     -  error
retry     unix  -  -  n  -     -  error
discard   unix  -  -  n  -     -  discard
anvil     unix  -  -  n  -     1  anvil
scache    unix  -  -  n  -     1  scache
postlog   unix-dgram n - n -   1  postlogd
"""


def _postfix_config(root: Path, port: int, refs: References) -> Path:
    etc, queue, data = root / "etc", root / "queue", root / "data"
    for d in (etc, queue, data):
        d.mkdir(parents=True)
    shutil.chown(data, user="postfix")
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(queue),
        "data_directory": str(data),
        "maillog_file_prefixes": str(root),
        "maillog_file": str(root / "maillog"),
        "myhostname": "postfix.bench.invalid",
        "mydestination": "",
        "inet_interfaces": HOST,
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "default_transport": "discard:onionpost bench",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        "smtpd_peername_lookup": "no",
    }
    (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
    (etc / "master.cf").write_text(_POSTFIX_MASTER_CF.format(listen=f"{HOST}:{port}"))
    # Creates the queue's subdirectories with Postfix's owners and modes (post-install).
    subprocess.run([refs.postfix_cmd, "-c", str(etc), "check"], check=True, capture_output=True)
    return etc


@dataclass(frozen=True)
class _Postfix:
    """A running private Postfix of :func:`postfix_server`."""

    root: Path
    port: int
    smtp_source: str | None
    sender: str = f"alice@{'a' * 56}.onion"
    rcpt: str = f"bob@{'b' * 56}.onion"


@contextlib.contextmanager
def postfix_server(root: Path, refs: References) -> Iterator[_Postfix | None]:
    """A private Postfix (None when it is not installed), stopped on exit."""
    if not refs.postfix:
        yield None
        return
    port = free_port()
    etc = _postfix_config(root, port, refs)
    daemon_dir = _output([refs.postconf, "-c", str(etc), "-h", "daemon_directory"])
    master = [str(Path(daemon_dir) / "master"), "-c", str(etc)]
    with running(master, [port], "Postfix master", root / "master.out"):
        yield _Postfix(root, port, refs.smtp_source)


def postfix_smtp(postfix: _Postfix, messages: int) -> SmtpResult:
    """The SMTP load against Postfix; returns once it has discarded the mail, too."""
    result = asyncio.run(
        smtp_load(
            postfix.port,
            login=None,
            sender=postfix.sender,
            rcpt=postfix.rcpt,
            messages=messages,
        )
    )
    _wait_until_empty(postfix.root / "queue")
    return result


def _wait_until_empty(queue: Path, timeout: float = 60.0) -> None:
    """Until no message is left in Postfix's queue (the discard transport is quick)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if not any(
                p.is_file()
                for sub in ("maildrop", "incoming", "active", "deferred")
                for p in (queue / sub).rglob("*")
            ):
                return
        except OSError:  # not ours to read: do not wait
            return
        time.sleep(0.1)


def postfix_smtp_source(postfix: _Postfix, messages: int) -> float | None:
    """Seconds for Postfix to take ``messages`` from its own C load generator."""
    if postfix.smtp_source is None:
        return None
    sample = postfix.root / "message.txt"
    sample.write_bytes(submission(postfix.sender, postfix.rcpt, 0).replace(b"\r\n", b"\n"))
    cmd = [
        postfix.smtp_source, "-d", "-s", str(SESSIONS), "-m", str(messages),
        "-f", postfix.sender, "-t", postfix.rcpt, "-F", str(sample), f"{HOST}:{postfix.port}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    seconds = time.perf_counter() - t0
    _wait_until_empty(postfix.root / "queue")
    return seconds


# --- Dovecot ----------------------------------------------------------------------------------

_DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
instance_name = onionpost-bench
log_path = {root}/dovecot.log
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/passwd
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/passwd
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0600
  }}
}}
# The same stored bytes as onionpost's (whose LMTP adds only Return-Path): same FETCH answers.
lmtp_add_received_header = no
lmtp_hdr_delivery_address = none
"""


@dataclass(frozen=True)
class DovecotResult:
    imap: ImapResult
    filing_seconds: float


def _measure_dovecot(
    root: Path, mails: list[tuple[int, bytes]], sizes: Sizes, refs: References
) -> DovecotResult:
    port = free_port()
    for sub in ("run", "state"):
        (root / sub).mkdir(parents=True)
    owner = pwd.getpwnam("nobody")
    home = root / "home"
    home.mkdir()
    os.chown(home, owner.pw_uid, owner.pw_gid)
    password = os.urandom(12).hex()
    (root / "passwd").write_text(
        f"bench:{{PLAIN}}{password}:{owner.pw_uid}:{owner.pw_gid}::{home}::\n"
    )
    conf = root / "dovecot.conf"
    conf.write_text(_DOVECOT_CONF.format(root=root, port=port))
    cmd = [refs.dovecot_cmd, "-F", "-c", str(conf)]
    with running(cmd, [port], "dovecot", root / "dovecot.out"):
        filing = asyncio.run(_file_through_lmtp(root / "run" / "lmtp", "bench", mails))
        imap = imap_run(port, "bench", password, len(mails), sizes.imap_passes)
    return DovecotResult(imap, filing)


# --- reporting --------------------------------------------------------------------------------


def report_smtp(ctx: Context, sizes: Sizes, smtp: SmtpComparison, refs: References) -> None:
    rounds = len(smtp.onion)
    ctx.heading(
        f"SMTP submission: {SESSIONS} concurrent sessions, {sizes.smtp_messages} messages of "
        f"{fmt_bytes(MESSAGE_BYTES)}"
        + (f" in {rounds} rounds, onionpost's and Postfix's alternating" if smtp.postfix else "")
        + "; 250 only after the durable commit; same asyncio client; per message = wall time "
        "/ messages"
    )
    onion = SmtpResult.merged(smtp.onion)
    subject = onion.per_message(f"onionpost, {SESSIONS} sessions")
    latency = onion.latency("onionpost latency p50")
    p99 = percentile(onion.latencies, 0.99)
    load = f"client CPU {onion.client_cpu / onion.seconds:.0%} of a core"
    if not smtp.postfix:
        ctx.figure(subject.name, f"{onion.rate:.0f} msg/s", extra=load)
        _report_node_cpu(ctx, onion)
        ctx.figure("onionpost latency p50 / p99", f"{fmt_time(latency.p50)} / {fmt_time(p99)}")
        ctx.note(f"Postfix reference: {refs.why_not.get('postfix', 'unavailable')}")
        return
    ref = SmtpResult.merged(smtp.postfix)
    pairs = list(zip(smtp.onion, smtp.postfix, strict=True))
    by_round = " / ".join(f"x{p.rate / o.rate:.2f}" for o, p in pairs)
    p50_by_round = " / ".join(
        f"x{statistics.median(o.latencies) / statistics.median(p.latencies):.2f}" for o, p in pairs
    )
    name = f"Postfix {refs.postfix} smtpd"
    ctx.compare(
        subject,
        ref.per_message(name),
        extra=f"{onion.rate:.0f} vs {ref.rate:.0f} msg/s; {load} vs "
        f"{ref.client_cpu / ref.seconds:.0%}; by round {by_round}",
    )
    ctx.compare(
        latency,
        ref.latency("Postfix latency p50"),
        extra=f"p99 {fmt_time(p99)} vs {fmt_time(percentile(ref.latencies, 0.99))}; "
        f"by round {p50_by_round}",
    )
    if smtp.smtp_source is not None:
        c_client = Stats("Postfix, smtp-source (C)", (smtp.smtp_source / sizes.smtp_messages,))
        ctx.compare(
            ref.per_message("Postfix, this Python client"),
            c_client,
            extra=f"{sizes.smtp_messages / smtp.smtp_source:.0f} msg/s with smtp-source -d "
            f"-s {SESSIONS} (no AUTH either): how far the Python client limits the reference",
        )
    _report_node_cpu(ctx, onion)
    ctx.note(
        "onionpost: AUTH PLAIN once per session, MAIL FROM must be the user, each 250 after "
        "its submission's commit, Sent copies left for later (the client saves none); "
        "Postfix: relay from 127.0.0.0/8, default_transport = discard."
    )


def _report_node_cpu(ctx: Context, onion: SmtpResult) -> None:
    """The node's CPU per message: less disturbed by other load on the machine than rates."""
    if onion.server_cpu is None or onion.server_cpu_settled is None:
        return
    ctx.figure(
        "onionpost node CPU per message",
        f"{onion.server_cpu / onion.messages * 1e3:.2f} ms",
        extra=f"while the load ran; {onion.server_cpu_settled / onion.messages * 1e3:.2f} ms "
        "until it had also sealed, delivered, synced and filed them (all threads)",
    )
    if onion.front_cpu is not None:
        ctx.figure(
            "onionpost SMTP front process CPU per message",
            f"{onion.front_cpu / onion.messages * 1e3:.2f} ms",
            extra="while the load ran (the protocol, on the other core)",
        )


def _report_imap(
    ctx: Context, sizes: Sizes, onion: ImapResult, dovecot: ImapResult | None, refs: References
) -> None:
    ctx.heading(
        f"IMAP first sync of a {sizes.folder:,}-message INBOX ({fmt_bytes(MESSAGE_BYTES)} each) "
        "with imaplib, a fresh session per pass (LOGIN not timed): SELECT INBOX, UID FETCH 1:* "
        "(UID FLAGS RFC822.SIZE ENVELOPE), FETCH 1:* (BODY.PEEK[HEADER]); cold = the first "
        f"session after the server started, warm = median of {sizes.imap_passes} more"
    )
    ref_name = f"Dovecot {refs.dovecot}"
    for cold in (True, False):
        when = "cold" if cold else "warm"
        for step, (label, _method, _args) in IMAP_STEPS.items():
            subject = onion.stats(step, f"{when} {label}", cold=cold)
            cpu = onion.client_cpu(step, cold=cold)
            if dovecot is None:
                ctx.figure(
                    subject.name, fmt_time(subject.p50), extra=f"imaplib CPU {fmt_time(cpu)}"
                )
                continue
            ref_cpu = dovecot.client_cpu(step, cold=cold)
            ctx.compare(
                subject,
                dovecot.stats(step, ref_name, cold=cold),
                extra=f"imaplib CPU {fmt_time(cpu)} vs {fmt_time(ref_cpu)}",
            )
        total = onion.total(cold=cold)
        per = fmt_time(total / sizes.folder)
        if dovecot is None:
            ctx.figure(f"{when} all three", fmt_time(total), extra=f"{per} per message")
            continue
        ref_total = dovecot.total(cold=cold)
        ctx.compare(
            Stats(f"{when} all three", (total,)),
            Stats(ref_name, (ref_total,)),
            extra=f"{per} vs {fmt_time(ref_total / sizes.folder)} per message",
        )
    served = fmt_bytes(onion.cold.header_bytes)
    if dovecot is None:
        ctx.note(f"BODY.PEEK[HEADER] served {served} of header blocks per pass.")
        ctx.note(f"Dovecot reference: {refs.why_not.get('dovecot', 'unavailable')}")
        return
    ctx.note(
        f"BODY.PEEK[HEADER] served {served} of header blocks per pass vs "
        f"{fmt_bytes(dovecot.cold.header_bytes)} from Dovecot. "
        "Both are Dovecot, both INBOXes filed through LMTP by the same client. LMTP leaves "
        "mail in new/; a stock Dovecot's first SELECT renames all of it into cur/ (10,000 "
        "renames here), while onionpost's node has its Dovecot do that soon after the mail "
        "stops arriving (maildir_empty_new and a doveadm sync): that is the cold SELECT row. "
        "imaplib CPU is this process reading the answers: it grows when a server sends them "
        "in many small pieces."
    )
