"""The filer's kept-open IMAP session to the real Dovecot (gateway/imapsession.py).

INBOX is filed with IMAP APPEND on a pre-authenticated ``imap`` process kept per user, the
looks (header search from a UID floor, \\Seen, UIDNEXT) go through the same session.  These
tests check what LMTP guaranteed still holds: the files are the same, UIDs follow the order
of filing, a restart finds what was filed, and a session whose process dies (before or
after Dovecot's commit) files the message exactly once.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway import imapsession
from gateway.dovecot import DovecotServer, Layout, Settings, find_installation, lmtp_deliver
from gateway.service import DovecotSink, _free_port
from onionpost.base.clock import FakeClock
from onionpost.core.errors import FilingDeferred, MailServerNotInstalled
from onionpost.device.filing import FILING_HEADER, Filer
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.filing import HANDED, FilingStore
from onionpost.testing.mailstore import maildir_messages

USER = "alice"


@pytest.fixture
async def dovecot(mail_tmp: Path) -> AsyncIterator[DovecotServer]:
    try:
        installation = find_installation()
    except MailServerNotInstalled as exc:
        pytest.skip(f"{exc} (scripts/system-deps.sh test installs it)")
    data = mail_tmp / "data"
    data.mkdir(mode=0o700)
    server = DovecotServer(
        Layout(data), Settings(imap_port=_free_port("127.0.0.1")), installation=installation
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        f"From: bob@example.onion\r\nTo: {USER}@example.onion\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@imap.test>\r\n\r\n"
    ).encode() + body


def session_pid(server: DovecotServer) -> int:
    pid = server.imap_sessions._sessions[USER].pid
    assert pid is not None
    return pid


async def test_append_files_like_lmtp_in_uid_order(dovecot: DovecotServer, tmp_path: Path) -> None:
    sink = DovecotSink(dovecot)
    data = dovecot.layout.data_dir
    # LMTP's file of the same message, for comparison (into another folder)
    lf = b"From: x\nSubject: lone LF\rand CR\n\nbody\n.\nno end"
    await lmtp_deliver(dovecot.lmtp_socket, USER, lf, folder="Archive", header=b"X-A: 1\r\n")
    spooled = tmp_path / "spooled"
    spooled.write_bytes(lf)
    assert await sink.next_uid(USER, "INBOX") == 1
    await sink.deliver(USER, "INBOX", spooled, header=b"X-A: 1\r\n")
    for i in range(2, 6):
        await sink.deliver(USER, "INBOX", message(f"m{i}"), header=f"X-A: {i}\r\n".encode())
    assert maildir_messages(data, USER, "INBOX")[0] == maildir_messages(data, USER, "Archive")[0]
    assert await sink.next_uid(USER, "INBOX") == 6
    # UIDs in the order of filing, found by header from a floor, and only from it
    session_uids = await dovecot.imap_sessions.run(
        USER, lambda s: imapsession.search(s, "INBOX", "X-A", "4", 1), idempotent=True
    )
    assert session_uids == [4]
    assert await sink.holds(USER, "INBOX", "X-A", "3", from_uid=3)
    assert not await sink.holds(USER, "INBOX", "X-A", "2", from_uid=3)
    assert not await sink.holds(USER, "INBOX", "X-A", "nowhere")
    # a value that cannot be quoted goes as a literal
    assert not await sink.holds(USER, "INBOX", "Subject", 'a "quoted\\ é')
    await sink.mark_seen(USER, "INBOX", "X-A", "5", from_uid=4)
    names = sorted(p.name for p in (data / "mail" / USER / "cur").iterdir())
    assert len(names) == 5 and sum(n.endswith(":2,S") for n in names) == 1
    # the node restarts: a new session, the same answers
    await dovecot.stop()
    await dovecot.start()
    assert await sink.holds(USER, "INBOX", "X-A", "3")
    assert await sink.next_uid(USER, "INBOX") == 6
    await sink.mark_seen(USER, "INBOX", "X-A", "2")
    names = [p.name for p in (data / "mail" / USER / "cur").iterdir()]
    assert sum(n.endswith(":2,S") for n in names) == 2


async def test_a_copy_to_be_seen_is_saved_flagged_and_like_lmtps(
    dovecot: DovecotServer, tmp_path: Path
) -> None:
    """A Sent copy goes by ``APPEND (\\Seen)``: flagged as it is saved (``:2,S``, no
    rename afterwards), the same bytes as LMTP's file, a client sees it \\Seen at once."""
    sink = DovecotSink(dovecot)
    data = dovecot.layout.data_dir
    body = message("sent copy")
    await lmtp_deliver(dovecot.lmtp_socket, USER, body, folder="Archive", header=b"X-A: 1\r\n")
    spooled = tmp_path / "copy"
    spooled.write_bytes(body)
    await sink.deliver(USER, "Sent", spooled, header=b"X-A: 1\r\n", seen=True)
    await sink.deliver(USER, "Sent", message("not seen"), header=b"X-A: 2\r\n")
    assert maildir_messages(data, USER, "Sent")[0] == maildir_messages(data, USER, "Archive")[0]
    sent = data / "mail" / USER / ".Sent"
    flagged = [p.name for p in (sent / "cur").iterdir() if p.name.endswith(":2,S")]
    assert len(flagged) == 1, sorted(p.name for p in sent.rglob("*") if p.is_file())

    async def seen_uids(session: imapsession.ImapSession) -> list[bytes]:
        await imapsession.search(session, "Sent", "X-A", "1", 1)  # selects Sent
        untagged, _ = await session.command(b"UID SEARCH", b"SEEN")
        return untagged

    seen = await dovecot.imap_sessions.run(USER, seen_uids, idempotent=True)
    assert [line.split()[2:] for line in seen if line.startswith(b"* SEARCH")] == [[b"1"]], seen
    assert await sink.holds(USER, "Sent", "X-A", "1")


async def test_a_dead_session_is_replaced_for_looks(dovecot: DovecotServer) -> None:
    sink = DovecotSink(dovecot)
    await sink.deliver(USER, "INBOX", message("one"), header=b"X-A: 1\r\n")
    first = session_pid(dovecot)
    os.kill(first, signal.SIGKILL)
    assert await sink.holds(USER, "INBOX", "X-A", "1")  # retried once on a new process
    assert session_pid(dovecot) != first
    await dovecot.stop()  # the sessions end with Dovecot
    assert not dovecot.imap_sessions._sessions
    with pytest.raises(FilingDeferred):
        await sink.next_uid(USER, "INBOX")
    await dovecot.start()


async def test_without_literal_plus_the_literal_waits_for_go_ahead(
    dovecot: DovecotServer,
) -> None:
    sink = DovecotSink(dovecot)
    await sink.deliver(USER, "INBOX", message("one"), header=b"X-A: 1\r\n")
    dovecot.imap_sessions._sessions[USER].literal_plus = False  # as if not offered
    await sink.deliver(USER, "INBOX", message("two"), header=b"X-A: 2\r\n")
    assert not await sink.holds(USER, "INBOX", "Subject", 'caf\u00e9 "x"')
    assert await sink.holds(USER, "INBOX", "X-A", "2", from_uid=2)
    assert await sink.next_uid(USER, "INBOX") == 3


class KillsTheSession(DovecotSink):
    """The session's process is SIGKILLed before the APPEND or after Dovecot's commit (the
    tagged OK lost): the filer must not know the outcome and file exactly once."""

    when = "before"
    kills = 0

    async def deliver(
        self,
        user: str,
        folder: str,
        message: Path | bytes,
        *,
        header: bytes,
        seen: bool = False,
    ) -> None:
        if self.kills:
            return await super().deliver(user, folder, message, header=header, seen=seen)
        self.kills += 1
        if self.when == "before":
            os.kill(session_pid(self.server), signal.SIGKILL)
            return await super().deliver(user, folder, message, header=header, seen=seen)
        await super().deliver(user, folder, message, header=header, seen=seen)
        os.kill(session_pid(self.server), signal.SIGKILL)
        raise FilingDeferred("Dovecot's imap ended (the tagged OK was lost).")


@pytest.mark.parametrize("when", ["before", "after"])
async def test_the_imap_process_killed_files_exactly_once(
    dovecot: DovecotServer, when: str
) -> None:
    data = dovecot.layout.data_dir
    db = Database(data / "device.db", DEVICE_COMPONENTS)
    try:
        store = FilingStore(db, data / "filing")
        clock = FakeClock()
        filer = Filer(store, clock=clock)
        sink = KillsTheSession(dovecot)
        sink.when = when
        await sink.next_uid(USER, "INBOX")  # a session is running
        filer.attach(sink)
        with db.transaction():
            ids = [
                filer.queue(
                    key=bytes([i]) * 16, user=USER, folder="INBOX", message=message(f"k{i}")
                )
                for i in range(3)
            ]
        await filer.run_due()
        keys = [i for i in ids if i is not None]
        left = store.get_many(keys)
        # Killed before: the NOOP that checks a reused session finds the process gone
        # before a byte of the APPEND is sent, and a new one files it.  Killed after the
        # commit: the row whose OK was lost stays handed (outcome unknown), the others went
        # through a new session.
        expect = [] if when == "before" else [(keys[0], HANDED)]
        assert [(r.id, r.state) for r in left] == expect
        clock.advance(3600)
        await filer.run_due()
        assert store.get_many(keys) == []
        box = data / "mail" / USER
        inbox = [p.read_bytes() for sub in ("new", "cur") for p in (box / sub).iterdir()]
        for i in range(3):
            key_line = f"{FILING_HEADER}: {(bytes([i]) * 16).hex()}".encode()
            assert sum(key_line in m for m in inbox) == 1
        assert len(inbox) == 3
    finally:
        db.close()


FAKE = """
import sys
sys.stdout.buffer.write(b"* PREAUTH [CAPABILITY IMAP4rev1 LITERAL+] fake\\r\\n")
sys.stdout.flush()
sys.stdin.buffer.readline()
sys.stdout.buffer.write({answer})
sys.stdout.flush()
if ({answer}).endswith(b"\\n"):
    sys.stdin.buffer.read()  # else the process ends, in the middle of a line
"""


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        # an answer we did not ask for, with a literal, and a flood of FETCH lines: skipped
        (
            r'b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n" + b"* 2 FETCH (FLAGS (S))\r\n" * 20_000'
            r' + b"* SEARCH 7\r\nf1 OK done\r\n"',
            True,
        ),
        (r'b"* " + b"x" * 70_000 + b"\r\nf1 OK done\r\n"', False),  # a line too long
        (r'b"* 1 FETCH (BODY[] {2000000}\r\n"', False),  # a literal too big to skip
        (r'(b"* SEARCH " + b"1 " * 20_000 + b"\r\n") * 10', False),  # more kept than allowed
        (r'b"f1 OK [unterminated"', False),  # the process ends mid-line
        (r'b"garbage\r\n"', False),
    ],
)
async def test_the_session_reads_bounded(answer: str, ok: bool) -> None:
    session = imapsession.ImapSession(
        [sys.executable, "-c", FAKE.format(answer=answer)], USER, timeout=60
    )
    await session.start()
    try:
        if ok:
            untagged, text = await session.command(b"NOOP")
            assert untagged == [b"* SEARCH 7"] and text == b"done"
            assert session.alive
        else:
            with pytest.raises(FilingDeferred):
                await session.command(b"NOOP")
            assert not session.alive  # killed: the next use starts a new process
    finally:
        await session.logout()
