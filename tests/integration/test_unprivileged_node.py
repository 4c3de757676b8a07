"""`onionpost run` as an ordinary user, as the systemd unit runs it (user `onionpost`) and as
`make run` runs for whoever types it: the node starts its own Dovecot without root, a client
sends over SMTP and reads over IMAP, and SIGTERM stops the node and its Dovecot.

As root, the test makes a temporary system account (see test_dovecot.py's fixture).
"""

from __future__ import annotations

import imaplib
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from gateway.dovecot import Installation, Layout

from .test_dovecot import (
    _as,
    _ours_running,
    _python_for,
    free_port,
    installation,
    unprivileged_user,
)

__all__ = ["installation", "unprivileged_user"]  # fixtures, used by name


def _wait(check, what: str, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _node_pid(pid: int) -> int:
    """The onionpost process: ``pid`` itself, or (as root) runuser's child."""
    if os.geteuid() != 0:
        return pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0])


def test_the_node_runs_as_an_unprivileged_user(
    installation: Installation, unprivileged_user: str
) -> None:
    python = _python_for(unprivileged_user)
    base = Path(tempfile.mkdtemp(prefix="op-user-", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        base.chmod(0o755)
        data = base / "data"
        data.mkdir(mode=0o700)
        smtp_port, imap_port = free_port(), free_port()
        (data / "onionpost.toml").write_text(
            '[tor]\nmode = "off"\n'
            f"[inbox]\nlisten_port = {free_port()}\npow_bits = 4\n"
            f"[gateway]\nsmtp_port = {smtp_port}\nimap_port = {imap_port}\n"
            f"autoconfig_port = {free_port()}\n"
        )
        if os.geteuid() == 0:
            account = pwd.getpwnam(unprivileged_user)
            for path in (data, data / "onionpost.toml"):
                os.chown(path, account.pw_uid, account.pw_gid)
        cli = [*python, "-m", "onionpost", "--data-dir", str(data)]
        init = subprocess.run(
            _as(unprivileged_user, [*cli, "init", "--user", "alice"]),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert init.returncode == 0, init.stdout + init.stderr
        password = init.stdout.split("password:")[1].split(maxsplit=1)[0]
        address = init.stdout.split("address:")[1].split(maxsplit=1)[0]
        log = (base / "node.log").open("ab")
        proc = subprocess.Popen(
            _as(unprivileged_user, [*cli, "run"]),
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        _wait(lambda: imaplib.IMAP4("127.0.0.1", imap_port, timeout=5).logout(), "IMAP")
        _wait(lambda: smtplib.SMTP("127.0.0.1", smtp_port, timeout=5).quit(), "SMTP")

        msg = EmailMessage()
        msg["From"] = msg["To"] = address
        msg["Subject"] = "a note to myself"
        msg.set_content("filed by a node that is not root\n")
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
            s.login("alice", password)
            s.send_message(msg)

        def in_inbox() -> bool:
            with imaplib.IMAP4("127.0.0.1", imap_port, timeout=10) as imap:
                imap.login("alice", password)
                imap.select("INBOX", readonly=True)
                _, found = imap.search(None, "SUBJECT", '"a note to myself"')
                return bool(found[0].split())

        _wait(in_inbox, "the message in INBOX over IMAP")
        maildir = data / "mail" / "alice"
        assert pwd.getpwuid(maildir.stat().st_uid).pw_name == unprivileged_user

        os.kill(_node_pid(proc.pid), signal.SIGTERM)  # the node, not runuser around it
        assert proc.wait(timeout=30) == 0, (base / "node.log").read_text()
        assert "onionpost node stopped" in (base / "node.log").read_text()
        assert not _ours_running(Layout(data))
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)
