"""Upgrading a data directory of the SQLite-mailbox versions: its mail ends up in Dovecot.

The data directory is the one ``tests/fixtures/make_sqlite_mailbox.py`` made with the previous
version's own code (checked in as a SQL dump): two users, nested and non-ASCII folders, names
Dovecot cannot store as they are, system flags, keywords (one message with more than Maildir
holds), internal dates, subscriptions, an expunged UID, a copy, a 1.5 MiB message.  The upgrade
runs, then a real Dovecot serves the result and imaplib checks it; and an upgrade interrupted
part-way and run again ends exactly like one that was not.
"""

from __future__ import annotations

import asyncio
import gzip
import imaplib
import shutil
import sqlite3
import ssl
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import gateway.mailbox_upgrade as upgrade_module
from gateway.dovecot import DovecotServer, Installation, Layout, Settings, choose_identity
from gateway.mailbox_upgrade import mutf7, upgrade_sqlite_mailbox
from onionpost.core.errors import MailServerError
from onionpost.store.db import Database
from tests.integration.test_dovecot import free_port, installation  # noqa: F401 - a fixture

DUMP = Path(__file__).resolve().parents[1] / "fixtures" / "sqlite-mailbox.sql.gz"
PASSWORD = "correct horse battery"
#: Names Dovecot cannot store as they are, and what they become.
RENAMED = {("alice", "v1.2 notes"): "v1_2 notes", ("alice", "~home"): "_home"}
UNSUBSCRIBED = {("alice", "Work"), ("alice", "v1.2 notes")}


@dataclass(frozen=True)
class Old:
    user: str
    folder: str
    uid: int
    data: bytes
    flags: frozenset[str]
    internal_date: int


@pytest.fixture
def data_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="opup-", dir="/tmp"))
    base.chmod(0o755)  # as root, Dovecot's mail account passes through (see test_dovecot.py)
    try:
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def restore(data_dir: Path) -> Path:
    """A data directory with the previous version's device.db."""
    data_dir.mkdir(mode=0o700, parents=True)
    path = data_dir / "device.db"
    conn = sqlite3.connect(path)
    try:
        conn.executescript(gzip.decompress(DUMP.read_bytes()).decode())
    finally:
        conn.close()
    return path


def old_messages(path: Path) -> list[Old]:
    """What the previous version's IMAP server showed, read from its tables."""
    names = {1: "\\Seen", 2: "\\Answered", 4: "\\Flagged", 8: "\\Deleted", 16: "\\Draft"}
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT f.user, f.name, m.uid, b.data, m.sysflags, m.keywords, m.internal_date"
            " FROM mailbox_messages m JOIN mailbox_folders f ON f.id = m.folder_id"
            " JOIN mailbox_bodies b ON b.id = m.body_id ORDER BY f.user, f.name, m.uid"
        ).fetchall()
    finally:
        conn.close()
    return [
        Old(user, folder, uid, bytes(data),
            frozenset([n for bit, n in names.items() if bits & bit] + keywords.split()), date)
        for user, folder, uid, data, bits, keywords, date in rows
    ]  # fmt: skip


def old_folders(path: Path) -> dict[tuple[str, str], bool]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT user, name, subscribed FROM mailbox_folders").fetchall()
    finally:
        conn.close()
    return {(user, name): bool(sub) for user, name, sub in rows}


def run_upgrade(data_dir: Path) -> upgrade_module.UpgradeReport:
    db = Database(data_dir / "device.db", ("seen",))
    try:
        return upgrade_sqlite_mailbox(db, Layout(data_dir), choose_identity(data_dir))
    finally:
        db.close()


def new_name(user: str, folder: str) -> str:
    return RENAMED.get((user, folder), folder)


async def test_upgrade_then_dovecot_serves_the_same_mail(
    installation: Installation,  # noqa: F811
    data_dir: Path,
) -> None:
    db_path = restore(data_dir)
    expected = old_messages(db_path)
    folders = old_folders(db_path)
    assert len(expected) == 24 and any(len(m.data) > 1_000_000 for m in expected)

    report = run_upgrade(data_dir)
    assert report.ran and report.users == 2 and report.folders == len(folders)
    assert report.messages == report.written == len(expected)
    assert {(u, o): n for u, o, n in report.renamed} == RENAMED
    assert report.dropped_keywords == (("alice", "Junk", "k26"),)
    assert not run_upgrade(data_dir).ran  # done: later starts skip it

    conn = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        seen = conn.execute("SELECT COUNT(*) FROM mailbox_seen_ids").fetchone()[0]
    finally:
        conn.close()
    assert not tables & set(upgrade_module.OLD_TABLES)
    assert {"mailbox_seen_ids", "mailbox_upgrade", "gateway_accounts", "contacts"} <= tables
    assert seen == 25  # every filed message's id: replays are still recognised

    layout = Layout(data_dir)
    ident = choose_identity(data_dir)
    for path in (layout.mail, *layout.mail.rglob("*")):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (ident.mail_uid, ident.mail_gid), path
        assert stat.S_IMODE(st.st_mode) == (0o700 if path.is_dir() else 0o600), path

    assert layout.resync_marker.exists()  # Dovecot is told the Maildirs were written without it
    server = DovecotServer(layout, Settings(imap_port=free_port()), installation=installation)
    for user in ("alice", "bob"):
        await server.set_password(user, PASSWORD)
    await server.start()
    assert not layout.resync_marker.exists()  # it reread every folder before answering
    try:
        for user in ("alice", "bob"):
            await asyncio.to_thread(check_over_imap, server, user, expected, folders)
    finally:
        await server.stop()


def check_over_imap(
    server: DovecotServer, user: str, expected: list[Old], folders: dict[tuple[str, str], bool]
) -> None:
    client = imaplib.IMAP4("127.0.0.1", server.settings.imap_port)
    client.starttls(ssl.create_default_context(cafile=str(server.layout.tls / "ca.pem")))
    client.login(user, PASSWORD)
    try:
        mine = {name for u, name in folders if u == user}
        typ, listing = client.list('""', "*")
        assert typ == "OK"
        listed = {
            line.rsplit(b' "/" ', 1)[1].strip(b'"').decode()
            for line in listing
            if isinstance(line, bytes)
        }
        assert {mutf7(new_name(user, name)) for name in mine} <= listed, listed
        typ, subscribed = client.lsub('""', "*")
        names = {
            line.rsplit(b' "/" ', 1)[1].strip(b'"').decode()
            for line in subscribed
            if isinstance(line, bytes)
        }
        for name in mine:
            want = (user, name) not in UNSUBSCRIBED
            assert (mutf7(new_name(user, name)) in names) == want, (name, names)
        for name in sorted(mine):
            msgs = [m for m in expected if m.user == user and m.folder == name]
            typ, _ = client.select(imaplib_name(new_name(user, name)), readonly=True)
            assert typ == "OK", name
            if not msgs:
                continue
            for seq, old in enumerate(msgs, 1):
                typ, data = client.fetch(str(seq), "(FLAGS INTERNALDATE BODY.PEEK[])")
                assert typ == "OK"
                head, body = data[0]
                assert body == old.data, (name, old.uid)
                flags = {f.decode() for f in imaplib.ParseFlags(head)} - {"\\Recent"}
                want = set(old.flags) - ({"k26"} if name == "Junk" else set())
                assert flags == want, (name, old.uid)
                parsed = imaplib.Internaldate2tuple(head)
                assert parsed is not None and int(time.mktime(parsed)) == old.internal_date
            typ, data = client.uid("SEARCH", "ALL")  # new UIDs, in the old order
            assert len(data[0].split()) == len(msgs)
    finally:
        client.logout()


def imaplib_name(name: str) -> str:
    return '"' + mutf7(name).replace("\\", "\\\\").replace('"', '\\"') + '"'


def maildir_state(layout: Layout) -> dict[str, tuple[bytes, int]]:
    """Every file below the Maildirs but tmp/: bytes, and the modification time of messages."""
    return {
        str(p.relative_to(layout.mail)): (
            p.read_bytes(),
            int(p.stat().st_mtime) if p.parent.name == "cur" else 0,
        )
        for p in layout.mail.rglob("*")
        if p.is_file() and p.parent.name != "tmp"
    }


def test_an_interrupted_upgrade_continues_without_duplicates_or_losses(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same data directory upgraded in one go, to compare with.
    reference = data_dir.parent / "reference"
    restore(reference)
    run_upgrade(reference)
    want = maildir_state(Layout(reference))

    restore(data_dir)
    real_write = upgrade_module._write_message
    calls = 0

    def failing(folder: Path, name: str, data: bytes, *args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 8:  # a crash while writing: half a file in tmp/, nothing in cur/
            (folder / "tmp" / name).write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real_write(folder, name, data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(upgrade_module, "_write_message", failing)
    with pytest.raises(MailServerError, match="start onionpost again to continue"):
        run_upgrade(data_dir)
    db_conn = sqlite3.connect(data_dir / "device.db")
    try:  # the old mailbox is untouched until the end
        assert db_conn.execute("SELECT COUNT(*) FROM mailbox_messages").fetchone()[0] == 24
    finally:
        db_conn.close()

    # A crash between a rename into cur/ and the end is the same as above, one step later.
    monkeypatch.setattr(upgrade_module, "_write_message", real_write)
    report = run_upgrade(data_dir)
    assert report.ran and report.messages == 24 and report.written == 24 - 7
    got = maildir_state(Layout(data_dir))
    assert got == want
    assert sum(1 for name in got if "/cur/" in f"/{name}") == 24
    assert not [p for p in Layout(data_dir).mail.rglob("tmp/*")]  # the half file was replaced
    assert not run_upgrade(data_dir).ran
