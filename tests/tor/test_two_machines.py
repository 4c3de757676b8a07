"""Inbox on a Pi, mail on a laptop, then a second device: real processes, real CLI, real tor.

Every machine is a separate `onionpost` process with its own tor on the private Tor network,
and reaches the others only through onion services.  P is an inbox-only node; alice's laptop
L joins it with `users invite` / `init --invite` (the used code then fails for anyone else), and
bob, invited separately, on a machine of his own; harry runs everything on one machine H and
answers both.
Mail goes through SMTP and IMAP.  L goes offline (mail waits on P, which restarts and keeps its
address), then a second device L2 joins with `devices add` / `init --join`, receives mail and
alice's Sent copies, and revokes L.  Finally P's data directory is inspected: no identity key,
no device key, no plaintext.
"""

from __future__ import annotations

import imaplib
import json
import os
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from onionpost.testing.ports import free_port
from onionpost.testing.tornet import TorNetwork
from tests.doctor_report import flagged_beyond_host

pytestmark = [pytest.mark.slow]

PLAIN = (
    "first from L",
    "first from bob",
    "reply from H",
    "reply to bob",
    "while L was away",
    "to both",
    "sent from L",
    "burst 0",
)


class Machine:
    """One data directory, its CLI and (when running) its `onionpost run` process."""

    def __init__(self, home: Path, net: TorNetwork, role: str | None = None) -> None:
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None
        self.imap, self.smtp = free_port(), free_port()
        self.password = ""
        self.user = ""
        home.mkdir(parents=True)
        lines = [f'role = "{role}"'] if role else []
        lines += [
            "[inbox]",
            "pow_bits = 8",
            "longpoll_seconds = 5.0",
            "[delivery]",
            "retry_min_seconds = 1",
            "retry_max_seconds = 5",
            "[gateway]",
            f"smtp_port = {self.smtp}",
            f"imap_port = {self.imap}",
            f"autoconfig_port = {free_port()}",
            "[tor]",
            f"extra_torrc = {json.dumps(net.client_torrc_lines())}",
            "bootstrap_timeout = 120",
        ]
        (home / "onionpost.toml").write_text("\n".join(lines) + "\n")

    def cli(self, *args: str, timeout: float = 300, ok: bool | None = True) -> str:
        """Run the CLI on this machine; ``ok=None`` leaves the exit status to the caller."""
        r = subprocess.run(
            [sys.executable, "-m", "onionpost", "--data-dir", str(self.home), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        out = r.stdout + r.stderr
        assert ok is None or (r.returncode == 0) == ok, out
        assert "Traceback" not in out, out
        return out

    def remember_login(self, out: str) -> None:
        self.user = out.split("user name:")[1].split(maxsplit=1)[0]
        self.password = out.split("password:")[1].split(maxsplit=1)[0]

    def start(self) -> None:
        status = self.home / "run" / "status.json"
        status.unlink(missing_ok=True)
        log = (self.home / "node.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onionpost", "--data-dir", str(self.home), "run"],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_for(lambda: self._published(status), f"{self.home.name} to publish", 180)

    def _published(self, status: Path) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log()
        try:
            info = json.loads(status.read_text())
        except (OSError, ValueError):
            return False
        tor = info.get("tor", {})
        # a gateway-only machine publishes no onion service: connected is ready
        published = bool(tor.get("published")) or info.get("role") == "gateway"
        return published and bool(tor.get("socks")) and bool(tor.get("healthy", True))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.proc = None

    def log(self) -> str:
        path = self.home / "node.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def send(self, to: str, *subjects: str) -> None:
        """One message per subject, in one SMTP session."""
        address = self.address
        with smtplib.SMTP("127.0.0.1", self.smtp, timeout=60) as s:
            s.login(self.user, self.password)
            for subject in subjects:
                m = EmailMessage()
                m["From"], m["To"], m["Subject"] = address, to, subject
                m["Message-ID"] = f"<{subject.replace(' ', '.')}.{time.time()}@two-machines.test>"
                m.set_content(f"{subject} (through tor)")
                s.send_message(m)

    def subjects(self, folder: str = "INBOX") -> list[str]:
        with imaplib.IMAP4("127.0.0.1", self.imap, timeout=60) as m:
            m.login(self.user, self.password)
            m.select(folder, readonly=True)
            _, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            out = []
            for part in data:
                if isinstance(part, tuple):
                    text = part[1].decode(errors="replace").strip()
                    out.append(text.removeprefix("Subject:").strip())
            return out

    @property
    def address(self) -> str:
        return self.cli("address").split()[0]


def wait_for(check: Callable[[], bool], what: str, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, imaplib.IMAP4.error):
            pass
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def machines(tor_network: TorNetwork, mail_tmp: Path) -> Iterator[Callable[..., Machine]]:
    made: list[Machine] = []

    def make(name: str, role: str | None = None) -> Machine:
        m = Machine(mail_tmp / name, tor_network, role)
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            m.stop()


def test_pi_and_laptop_then_a_second_device_over_tor(
    machines: Callable[..., Machine],
) -> None:
    pi = machines("pi")
    out = pi.cli("init", "--role", "inbox")
    assert "Nobody's keys are here" in out
    pi.start()
    harry = machines("harry")
    harry.remember_login(harry.cli("init", "--user", "harry", "--device-name", "desk"))
    harry.start()

    # the doctor reaches the Pi's onion through a circuit of its own
    report = pi.cli("doctor", ok=None)
    assert "answers through a separate circuit" in report
    assert flagged_beyond_host(report) == [], report
    invite = json.loads(pi.cli("users", "invite", "alice", "--json"))
    laptop = machines("laptop")
    out = laptop.cli("init", "--invite", invite["code"], "--device-name", "laptop")
    laptop.remember_login(out)
    alice = f"alice@{invite['inbox']}"
    assert alice in out
    laptop.start()

    # the code was used: nobody else gets alice's mailbox with it
    out = machines("intruder").cli("init", "--invite", invite["code"], ok=False)
    assert "already used" in out

    # a second person on the same Pi, invited separately, on a machine of their own
    bob_invite = json.loads(pi.cli("users", "invite", "bob", "--json"))
    bobs = machines("bobs-laptop")
    bobs.remember_login(bobs.cli("init", "--invite", bob_invite["code"]))
    bob = f"bob@{bob_invite['inbox']}"
    bobs.start()

    laptop.send(harry.address, "first from L")
    bobs.send(harry.address, "first from bob")
    wait_for(lambda: {"first from L", "first from bob"} <= set(harry.subjects()), "L, B -> H")
    harry.send(alice, "reply from H")
    harry.send(bob, "reply to bob")
    wait_for(lambda: "reply from H" in laptop.subjects(), "H -> L")
    wait_for(lambda: "reply to bob" in bobs.subjects(), "H -> B")
    assert "reply to bob" not in laptop.subjects()
    bobs.stop()

    # the laptop is away; the mail waits on the Pi, which restarts and keeps its address
    laptop.stop()
    harry.send(alice, "while L was away")
    time.sleep(5)
    pi.stop()
    pi.start()
    assert json.loads(pi.cli("users", "invite", "nobody", "--json"))["inbox"] == invite["inbox"]
    laptop.start()
    wait_for(lambda: "while L was away" in laptop.subjects(), "mail that waited on P")

    # a second device joins alice's identity
    adder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "onionpost",
            "--data-dir",
            str(laptop.home),
            "devices",
            "add",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert adder.stdout is not None
        offered = json.loads(adder.stdout.readline())
        laptop2 = machines("laptop2")
        out = laptop2.cli("init", "--join", offered["code"], "--device-name", "laptop2")
        assert "holds your identity key" in out
        laptop2.remember_login(out)
        stdout, stderr = adder.communicate(timeout=120)
        assert adder.returncode == 0, stdout + stderr
        assert json.loads(stdout.strip().splitlines()[-1])["name"] == "laptop2"
    finally:
        if adder.poll() is None:
            adder.kill()
    laptop2.start()
    listing = laptop2.cli("devices")
    assert "laptop2" in listing and "<- this device" in listing and "laptop " in listing
    # (L made the change, so L files no notice; devices that did not are notified, see
    # tests/integration/test_enrolment.py)

    time.sleep(61)  # harry's directory batches key fetches for a minute; then it sees L2
    harry.send(alice, "to both")
    wait_for(lambda: "to both" in laptop2.subjects(), "H -> L2")
    wait_for(lambda: "to both" in laptop.subjects(), "H -> L")
    laptop.send(harry.address, "sent from L")
    wait_for(lambda: "sent from L" in laptop2.subjects("Sent"), "L's Sent copy on L2")

    # a burst from L: what L seals together goes to P in a few requests (POST
    # /v1/device/submissions over tor); each message reaches harry once
    burst = [f"burst {i}" for i in range(8)]
    laptop.send(harry.address, *burst)
    wait_for(lambda: set(burst) <= set(harry.subjects()), "a burst L -> H")
    assert all(harry.subjects().count(b) == 1 for b in burst)

    # L2 revokes L: the inbox refuses L at once, harry's next mail reaches only L2
    l_id = next(
        line.split()[0] for line in laptop.cli("devices").splitlines() if "this device" in line
    )
    assert "Revoked" in laptop2.cli("devices", "revoke", l_id)
    time.sleep(61)
    harry.send(alice, "after the revocation")
    wait_for(lambda: "after the revocation" in laptop2.subjects(), "H -> L2 after revoke")
    assert "after the revocation" not in laptop.subjects()

    # the Pi: no identity key, no device key, no plaintext
    for m in (laptop, laptop2, harry, pi):
        m.stop()
    users = pi.cli("users", "list")
    assert alice in users and bob in users
    assert not (pi.home / "users").exists() and not (pi.home / "device.db").exists()
    assert sorted(p.name for p in (pi.home / "inbox").iterdir()) == ["server.key"]
    db = sqlite3.connect(pi.home / "inbox.db")
    try:
        stored = b"".join(
            v if isinstance(v, bytes) else str(v).encode()
            for table in ("sealed", "outbox", "mailboxes", "devices")
            for row in db.execute(f"SELECT * FROM {table}")
            for v in row
        )
    finally:
        db.close()
    for plain in PLAIN:
        assert plain.encode() not in stored
    assert os.stat(pi.home / "inbox.db").st_mode & 0o077 == 0
