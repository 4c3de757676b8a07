"""The node's Dovecot dies: the node restarts it, `onionpost status` says so, and mail that
arrived meanwhile waits in the filing queue and is filed once Dovecot is back."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import ssl
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path

from .test_imap_flood import RunningNode, running_node
from .test_imap_gateway import Gateway, installation


def status(node: RunningNode) -> dict[str, object]:
    return dict(json.loads((node.data_dir / "run" / "status.json").read_text()))


def until(check, what: str, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_a_killed_dovecot_is_restarted_and_status_says_so() -> None:
    with running_node() as node:
        until(lambda: isinstance(status(node).get("mail_server"), dict), "the status file")
        server = status(node)["mail_server"]
        assert isinstance(server, dict) and server["status"] == "running"
        os.kill(int(server["pid"]), signal.SIGKILL)

        def restarted() -> bool:
            s = status(node)["mail_server"]
            return isinstance(s, dict) and s["restarts"] == 1 and s["status"] == "running"

        until(restarted, "the node to restart Dovecot")
        out = node.cli("status")
        assert "mailbox:    Dovecot running, restarted 1 time(s)" in out, out
        assert "Dovecot exited" in node.log_path.read_text()

        # and mail flows again: to myself over SMTP, read back over IMAP
        msg = EmailMessage()
        msg["From"] = msg["To"] = node.address
        msg["Subject"] = "after the restart"
        msg.set_content("hello again\n")
        with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=60) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=node.ca_file))
            smtp.login("alice", node.password)
            smtp.send_message(msg)
        imap = node.imap()
        try:

            def arrived() -> bool:
                imap.select("INBOX", readonly=True)
                _, found = imap.search(None, "SUBJECT", '"after the restart"')
                return bool(found[0].split())

            until(arrived, "the message in INBOX")
        finally:
            imap.logout()


def test_what_an_earlier_run_left_does_not_stop_dovecot_from_starting() -> None:
    """A Dovecot left running by a node killed hard is stopped; a ``master.pid`` whose number
    now belongs to an unrelated process (pids wrap at 32768) is cleared, not obeyed."""
    gw = Gateway()
    orphan = 0
    try:
        gw.run(gw.server.stop())
        # what a node killed hard leaves: its Dovecot, running on, no longer anyone's child
        daemon = [str(installation().dovecot), "-c", str(gw.layout.config)]
        subprocess.run(daemon, check=True, timeout=60)
        pid_file = gw.layout.base_dir / "master.pid"
        until(lambda: pid_file.exists() and pid_file.read_text().strip(), "the daemon's pid")
        orphan = int(pid_file.read_text().split()[0])
        gw.run(gw.server.start())
        assert not _running(orphan)
        gw.client().logout()
        gw.run(gw.server.stop())

        unrelated = subprocess.Popen(["sleep", "600"])
        try:
            (gw.layout.base_dir / "master.pid").write_text(f"{unrelated.pid}\n")
            gw.run(gw.server.start())
            gw.client().logout()
            assert unrelated.poll() is None  # left alone
        finally:
            unrelated.kill()
            unrelated.wait()
    finally:
        gw.stop()
        if orphan and _running(orphan):  # the test failed before the node stopped it
            os.killpg(orphan, signal.SIGKILL)


def test_a_dead_masters_stragglers_are_ended_before_dovecot_starts() -> None:
    """A master killed hard can leave children behind that hold its listeners, and a new
    master refused to start ("Socket already exists" for the LMTP socket).  The children of
    a master that is gone are ended first; Dovecot's own children, when it stops, are gone
    before ``stop`` returns."""
    gw = Gateway()
    try:
        master = gw.server.pid
        assert master is not None
        children = [p for p in _group(master) if p != master]
        assert children and all(
            Path(f"/proc/{p}/cmdline").read_bytes().startswith(b"dovecot") for p in children
        )
        gw.run(gw.server.stop())
        assert not [p for p in _group(master) if _running(p)]

        # a group whose leader (the master) is gone and one child of which lives on
        leader = subprocess.Popen(
            ["bash", "-c", "(exec -a dovecot/lmtp sleep 600) & echo $!"],
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert leader.stdout is not None
        with leader.stdout:
            straggler = int(leader.stdout.readline())
        leader.wait(timeout=60)
        try:
            assert _running(straggler)
            (gw.layout.base_dir / "master.pid").write_text(f"{leader.pid}\n")
            gw.run(gw.server.start())
            assert not _running(straggler)
            gw.client().logout()
        finally:
            if _running(straggler):
                os.kill(straggler, signal.SIGKILL)
    finally:
        gw.stop()


def _group(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
