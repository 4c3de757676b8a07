"""Exactly once into Dovecot when the node dies between LMTP's 250 and its own record.

A filer in a child process hands a queued message to the real Dovecot's LMTP and is killed
(SIGKILL, no cleanup) either right after the 250 or right after marking the row handed but
before LMTP saw a byte.  A new filer (the restarted node) then settles the row: the message
is in the mailbox exactly once either way.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.dovecot import DovecotServer, Layout, Settings, find_installation
from gateway.service import DovecotSink, _free_port
from onionpost.base.clock import SystemClock
from onionpost.core.errors import MailServerNotInstalled
from onionpost.device.filing import FILING_HEADER, Filer
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.filing import HANDED, FilingStore
from onionpost.testing.mailstore import maildir_messages

REPO = Path(__file__).resolve().parents[2]
USER = "alice"

CHILD = textwrap.dedent(
    """
    import asyncio, os, signal, sys, time
    from pathlib import Path
    from gateway.dovecot import lmtp_deliver
    from onionpost.base.clock import SystemClock
    from onionpost.device.filing import Filer
    from onionpost.store import DEVICE_COMPONENTS
    from onionpost.store.db import Database
    from onionpost.store.filing import FilingStore

    data, socket_path, when = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    class DiesAtTheWorstMoment:
        async def deliver(self, user, folder, message, *, header, seen=False):
            if when == "before":
                os.kill(os.getpid(), signal.SIGKILL)  # handed, LMTP never saw it
            await lmtp_deliver(socket_path, user, message, folder=folder, header=header)
            os.kill(os.getpid(), signal.SIGKILL)  # Dovecot has it; our row still says handed

        async def holds(self, user, folder, header, value, *, from_uid=1):
            return False  # the first attempt: nothing to look up

        async def mark_seen(self, user, folder, header, value, *, from_uid=1):
            raise AssertionError("not reached")

        async def next_uid(self, user, folder):
            return 1

    db = Database(data / "device.db", DEVICE_COMPONENTS)
    filer = Filer(FilingStore(db, data / "filing"), clock=SystemClock())
    filer.attach(DiesAtTheWorstMoment())
    asyncio.run(filer.run_due())
    sys.exit("the filer was not killed")
    """
)


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


def message(subject: str) -> bytes:
    return (
        f"From: bob@example.onion\r\nTo: {USER}@example.onion\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@crash.test>\r\n\r\nhello\r\n"
    ).encode()


def count(data: Path, subject: str) -> int:
    needle = f"Subject: {subject}\r\n".encode()
    return sum(needle in m for m in maildir_messages(data, USER, "INBOX"))


@pytest.mark.parametrize("when", ["after", "before"])
async def test_killed_between_lmtp_and_the_record_files_exactly_once(
    dovecot: DovecotServer, when: str
) -> None:
    data = dovecot.layout.data_dir
    db = Database(data / "device.db", DEVICE_COMPONENTS)
    try:
        store = FilingStore(db, data / "filing")
        filer = Filer(store, clock=SystemClock())
        subject = f"killed {when} the 250"
        with db.transaction():
            filing_id = filer.queue(
                key=b"k" * 16, user=USER, folder="INBOX", message=message(subject)
            )
        assert filing_id is not None

        child = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", CHILD, str(data), str(dovecot.lmtp_socket), when],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert child.returncode == -9, child.stderr
        row = store.get(filing_id)
        assert row is not None and row.state == HANDED  # the record never learned the outcome
        assert count(data, subject) == (1 if when == "after" else 0)

        # the node starts again: the filer looks the row up in Dovecot before filing it
        filer.attach(DovecotSink(dovecot))
        assert await filer.run_due() == 1
        assert store.get(filing_id) is None
        assert not store.path(b"k" * 16).exists()
        assert count(data, subject) == 1
        key_line = f"{FILING_HEADER}: {(b'k' * 16).hex()}".encode()
        raw = [p.read_bytes() for p in (data / "mail" / USER).glob("*/*") if p.is_file()]
        assert sum(key_line in r for r in raw) == 1  # the key the lookup found
    finally:
        db.close()
