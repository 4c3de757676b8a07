"""Group commit end to end: many SMTP clients at once, SIGKILL right after their 250s, and
every acknowledged message is in the store.

A real ``onionpost run`` (tor off, alice and bob on one node) takes 16 concurrent smtplib
sessions, each sending several messages with their own Message-IDs, so the gateway's
submissions share commits (onionpost.base.groupcommit).  The moment the last 250 arrives the node
is killed with SIGKILL, without any chance to flush anything; then its database is opened
and every acknowledged Message-ID must be there: the submission (which the sealing worker
hands to bob) and its Sent copy (still queued, with its body in the database, or already
filed in Dovecot's Sent).  The node then starts again on the same data and stays usable.
No timing is asserted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import smtplib
import subprocess
import sys
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from onionpost.app.provision import add_user, initialize
from onionpost.base.config import load
from onionpost.store.db import Database
from onionpost.testing.mailstore import maildir_messages
from onionpost.testing.ports import free_port

pytestmark = pytest.mark.slow

SESSIONS = 16
PER_SESSION = 8
REPO = Path(__file__).resolve().parents[2]


def _setup(config, account) -> str:  # type: ignore[no-untyped-def]
    from gateway.setup import setup_account

    return setup_account(config, account)


async def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the node exited:\n" + log.read_text()[-3000:])
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"the node did not open port {port}:\n" + log.read_text()[-3000:])


def _session(port: int, password: str, sender: str, to: str, ids: list[str]) -> list[str]:
    """One client: log in, send its messages; the Message-IDs that got 250."""
    acked: list[str] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.login("alice", password)
        for msg_id in ids:
            msg = EmailMessage()
            msg["From"] = sender
            msg["To"] = to
            msg["Subject"] = f"group commit {msg_id}"
            msg["Message-ID"] = msg_id
            msg.set_content(f"body of {msg_id}\n" * 50)
            s.send_message(msg)  # raises unless 250
            acked.append(msg_id)
    return acked


def _stored(data_dir: Path) -> tuple[set[str], set[str]]:
    """(Message-IDs of stored submissions, Message-IDs of their queued Sent copies)."""
    db = Database(data_dir / "device.db", ("submissions", "filing"))
    try:
        submitted = {str(r[0]) for r in db.all("SELECT message_ref FROM submissions")}
        sent: set[str] = set()
        for r in db.all(
            "SELECT b.message FROM filing_queue q JOIN filing_bodies b ON b.id = q.id"
            " WHERE q.folder = 'Sent'"
        ):
            for line in bytes(r[0]).split(b"\r\n\r\n", 1)[0].splitlines():
                if line.lower().startswith(b"message-id:"):
                    sent.add(line.split(b":", 1)[1].strip().decode())
        return submitted, sent
    finally:
        db.close()


def _filed_sent(data_dir: Path) -> set[str]:
    ids = set()
    for m in maildir_messages(data_dir, "alice", "Sent"):
        for line in m.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"message-id:"):
                ids.add(line.split(b":", 1)[1].strip().decode())
    return ids


async def test_concurrent_submissions_all_durable_after_sigkill(mail_tmp: Path) -> None:
    data_dir = mail_tmp / "node"
    data_dir.mkdir(mode=0o700)
    smtp, imap, auto, api = (free_port() for _ in range(4))
    (data_dir / "onionpost.toml").write_text(
        f'[tor]\nmode = "off"\n[inbox]\nlisten_port = {api}\n'
        f"[gateway]\nsmtp_port = {smtp}\nimap_port = {imap}\nautoconfig_port = {auto}\n"
    )
    config = load(data_dir)
    now = int(time.time())
    alice = initialize(config, local="alice", device_name="laptop", now=now, gateway_setup=_setup)
    bob = add_user(config, local="bob", device_name="laptop", now=now)
    assert alice.password is not None
    log = mail_tmp / "node.log"

    def start() -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "onionpost", "--data-dir", str(data_dir), "run"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=REPO,
                env={**os.environ, "ONIONPOST_HOME": str(data_dir)},
            )

    proc = start()
    try:
        await _wait_port(smtp, proc, log)
        batches = [
            [f"<gc.{s}.{i}.{os.urandom(4).hex()}@test>" for i in range(PER_SESSION)]
            for s in range(SESSIONS)
        ]
        with concurrent.futures.ThreadPoolExecutor(SESSIONS) as pool:
            futures = [
                pool.submit(_session, smtp, alice.password, str(alice.address), str(bob.address), b)
                for b in batches
            ]
            acked = [msg_id for f in futures for msg_id in f.result()]
            # The last 250 is in: kill at once, before anything else can reach the disk.
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert len(acked) == SESSIONS * PER_SESSION

        submitted, queued_sent = _stored(data_dir)
        missing = [m for m in acked if m not in submitted]
        assert not missing, f"{len(missing)} acknowledged submissions were lost: {missing[:5]}"
        sent = queued_sent | _filed_sent(data_dir)
        assert not [m for m in acked if m not in sent], "a Sent copy was lost"

        # The node starts again on what the kill left and still takes mail.
        proc = start()
        await _wait_port(smtp, proc, log)
        after = await asyncio.to_thread(
            _session,
            smtp,
            alice.password,
            str(alice.address),
            str(bob.address),
            ["<gc.after@test>"],
        )
        assert after == ["<gc.after@test>"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    submitted, _ = _stored(data_dir)
    assert set(acked) | {"<gc.after@test>"} <= submitted
