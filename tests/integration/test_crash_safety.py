"""Nothing lost, nothing duplicated, while both nodes are killed again and again.

Two real `onionpost run` processes (alice's and bob's nodes, tor off, each other's inbox on a
static loopback route) exchange 1000 messages submitted over SMTP, while a killer sends SIGKILL
to one node or the other at random moments (at least 20 times) and restarts it.  Each SMTP
attempt carries its own Message-ID, so at the end:

* every message that was acknowledged (250) is filed exactly once in bob's INBOX;
* a message whose acknowledgement was lost (the node died mid-reply) is filed at most once.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from onionpost.app.provision import initialize
from onionpost.base.config import load
from onionpost.core.address import Address
from onionpost.testing.mailstore import maildir_messages
from onionpost.testing.ports import free_port

pytestmark = pytest.mark.slow

MESSAGES = int(os.environ.get("CRASH_MESSAGES", "1000"))
MIN_KILLS = 20


class NodeProcess:
    def __init__(self, root: Path, user: str) -> None:
        self.dir = root / user
        self.user = user
        self.api, self.smtp, self.imap, self.auto = (free_port() for _ in range(4))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "node.log"
        self.kills = 0

    def init(self) -> None:
        result = initialize(
            load(self.dir),
            local=self.user,
            device_name="laptop",
            now=int(time.time()),
            gateway_setup=_setup,
        )
        self.address = result.address
        self.password = result.password

    def configure(self, peer: NodeProcess) -> None:
        (self.dir / "onionpost.toml").write_text(
            f'[tor]\nmode = "off"\nstatic_routes = {{ "{peer.address.onion}" = '
            f'"127.0.0.1:{peer.api}" }}\n'
            f"[inbox]\nlisten_port = {self.api}\npow_bits = 4\nlongpoll_seconds = 2.0\n"
            # one sender pushing 1000 messages an hour would trip the anti-abuse limits
            "rate_per_mailbox_per_hour = 100000\nrate_per_source_per_hour = 100000\n"
            "rate_strangers_per_mailbox_per_hour = 100000\nrate_strangers_per_hour = 100000\n"
            f"[gateway]\nsmtp_port = {self.smtp}\nimap_port = {self.imap}\n"
            f"autoconfig_port = {self.auto}\n"
            "[delivery]\nretry_min_seconds = 1\nretry_max_seconds = 2\n"
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
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    async def wait_port(self, port: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise AssertionError(
            f"{self.user}'s node did not open port {port}:\n" + self.log.read_text()[-3000:]
        )


def _setup(config, account) -> str:  # type: ignore[no-untyped-def]
    from gateway.setup import setup_account

    return setup_account(config, account)


def _send_batch(node: NodeProcess, to: Address, batch: list[tuple[str, int]]) -> list[str]:
    """Submit messages over one SMTP session, as a mail client does; returns the ids that
    were acknowledged with 250 (the session may die part way through)."""
    acked: list[str] = []
    try:
        with smtplib.SMTP("127.0.0.1", node.smtp, timeout=10) as s:
            s.login(node.user, node.password or "")
            for msg_id, n in batch:
                msg = EmailMessage()
                msg["From"] = str(node.address)
                msg["To"] = str(to)
                msg["Subject"] = f"message {n}"
                msg["Message-ID"] = msg_id
                msg.set_content(f"number {n}\n")
                s.send_message(msg)
                acked.append(msg_id)
    except (OSError, smtplib.SMTPException):
        pass
    return acked


def _filed(node: NodeProcess) -> list[str]:
    """Message-IDs in the INBOX of the node's Dovecot (its Maildir)."""
    ids = []
    for m in maildir_messages(node.dir, node.user, "INBOX"):
        for line in m.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                ids.append(line.split(b":", 1)[1].strip().decode())
    return ids


async def test_kill_both_nodes_repeatedly_and_lose_nothing(mail_tmp: Path) -> None:
    alice, bob = NodeProcess(mail_tmp, "alice"), NodeProcess(mail_tmp, "bob")
    try:
        await _kill_repeatedly(alice, bob)
    finally:  # a failed run leaves no node running behind it
        for n in (alice, bob):
            n.stop()


async def _kill_repeatedly(alice: NodeProcess, bob: NodeProcess) -> None:
    for n in (alice, bob):
        n.init()
    alice.configure(bob)
    bob.configure(alice)
    for n in (alice, bob):
        n.start()
    await alice.wait_port(alice.smtp)
    await bob.wait_port(bob.api)

    acked: set[str] = set()
    attempted: set[str] = set()
    rng = random.Random(7)
    done = asyncio.Event()

    async def killer() -> None:
        while not done.is_set() or alice.kills + bob.kills < MIN_KILLS:
            await asyncio.sleep(rng.uniform(0.3, 1.2))
            victim = rng.choice((alice, bob))
            victim.kill()
            await asyncio.sleep(rng.uniform(0.0, 0.5))
            victim.start()
            await victim.wait_port(victim.smtp if victim is alice else victim.api)

    async def sender() -> None:
        n = 0
        attempt = 0
        while n < MESSAGES:
            batch = []
            for k in range(n, min(n + 10, MESSAGES)):
                attempt += 1
                batch.append((f"<m{k}.a{attempt}@crash.test>", k))
            attempted.update(mid for mid, _ in batch)
            ok = await asyncio.to_thread(_send_batch, alice, bob.address, batch)
            acked.update(ok)
            n += len(ok)
            if len(ok) < len(batch):
                await asyncio.sleep(0.2)
        done.set()

    kill_task = asyncio.create_task(killer())
    try:
        await asyncio.wait_for(sender(), timeout=600)
        await asyncio.wait_for(kill_task, timeout=120)
    finally:
        kill_task.cancel()
    assert alice.kills + bob.kills >= MIN_KILLS
    assert len(acked) == MESSAGES

    # both nodes up and left alone: everything drains
    deadline = time.monotonic() + 180
    filed: list[str] = []
    while time.monotonic() < deadline:
        filed = _filed(bob)
        if acked <= set(filed):
            break
        await asyncio.sleep(1)
    for n in (alice, bob):
        n.stop()
    filed = _filed(bob)
    counts: dict[str, int] = {}
    for mid in filed:
        counts[mid] = counts.get(mid, 0) + 1
    lost = sorted(acked - set(counts))
    duplicated = sorted(m for m, c in counts.items() if c > 1)
    strangers = sorted(set(counts) - attempted)
    assert not lost, f"{len(lost)} acknowledged messages never arrived, e.g. {lost[:5]}"
    assert not duplicated, f"filed more than once: {duplicated[:5]}"
    assert not strangers
    print(
        f"\n{len(acked)} acknowledged, {len(filed)} filed, kills: alice {alice.kills}, "
        f"bob {bob.kills}, unacknowledged attempts filed once: {len(set(counts) - acked)}"
    )
