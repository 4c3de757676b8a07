"""MailboxStore on a real SQLite file: UIDs, exactly-once filing, Sent dedup, crashes."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from onionpost.errors import FolderExists, FolderNotFound, FolderProtected, InvalidFolderName
from onionpost.store.db import Database, available_migrations
from onionpost.store.mailbox import FlagOp, MailboxStore

USER = "alice"
REPO = Path(__file__).resolve().parents[2]


def mail(subject: str, msg_id: str | None = None, body: bytes = b"hello\r\n") -> bytes:
    head = f"From: Bob <bob@example.onion>\r\nTo: alice@example.onion\r\nSubject: {subject}\r\n"
    head += "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    if msg_id:
        head += f"Message-ID: {msg_id}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "device.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[MailboxStore]:
    db = Database(db_path, ["mailbox"])
    mailbox = MailboxStore(db)
    mailbox.ensure_user(USER)
    yield mailbox
    db.close()


def reopen(db_path: Path) -> tuple[Database, MailboxStore]:
    db = Database(db_path, ["mailbox"])
    return db, MailboxStore(db)


# -- folders and UIDs -------------------------------------------------------------------------


def test_standard_folders_with_special_use(store: MailboxStore) -> None:
    folders = {f.name: f.special_use for f in store.folders(USER)}
    assert folders == {
        "INBOX": None,
        "Sent": "\\Sent",
        "Drafts": "\\Drafts",
        "Trash": "\\Trash",
        "Junk": "\\Junk",
        "Archive": "\\Archive",
    }
    store.ensure_user(USER)  # idempotent
    assert len(store.folders(USER)) == 6
    assert store.folder(USER, "inbox").name == "INBOX"


def test_uids_grow_and_survive_reopen(store: MailboxStore, db_path: Path) -> None:
    uids = [store.file_message(USER, "INBOX", mail(f"m{i}"), internal_date=i) for i in range(5)]
    assert uids == [1, 2, 3, 4, 5]
    inbox = store.folder(USER, "INBOX")
    store.expunge(inbox.id, [5])
    assert store.file_message(USER, "INBOX", mail("after"), internal_date=9) == 6  # never reused
    db, again = reopen(db_path)
    try:
        reopened = again.folder(USER, "INBOX")
        assert reopened.uidvalidity == inbox.uidvalidity
        assert reopened.uidnext == 7
        assert [m.uid for m in again.messages(reopened.id)] == [1, 2, 3, 4, 6]
    finally:
        db.close()


def test_uidvalidity_is_new_for_a_recreated_folder(store: MailboxStore) -> None:
    first = store.create_folder(USER, "Work")
    store.delete_folder(USER, "Work")
    second = store.create_folder(USER, "Work")
    assert second.uidvalidity > first.uidvalidity
    assert second.id != first.id


def test_folder_hierarchy_rename_and_protection(store: MailboxStore) -> None:
    store.create_folder(USER, "Work")
    store.create_folder(USER, "Work/Projects")
    store.file_message(USER, "Work/Projects", mail("p"), internal_date=1)
    projects = store.folder(USER, "Work/Projects")
    store.rename_folder(USER, "Work", "Jobs")
    renamed = store.folder(USER, "Jobs/Projects")
    assert (renamed.id, renamed.uidvalidity) == (projects.id, projects.uidvalidity)
    assert [m.uid for m in store.messages(renamed.id)] == [1]
    with pytest.raises(FolderNotFound):
        store.folder(USER, "Work")
    with pytest.raises(FolderExists):
        store.create_folder(USER, "Jobs")
    for name in ("Sent", "INBOX", "Trash"):
        with pytest.raises(FolderProtected):
            store.delete_folder(USER, name)
    with pytest.raises(FolderProtected):
        store.rename_folder(USER, "Drafts", "Old drafts")
    for bad in ("", "a//b", "/a", "a/", "x*", "tab\there"):
        with pytest.raises(InvalidFolderName):
            store.create_folder(USER, bad)


def test_renaming_inbox_moves_its_messages(store: MailboxStore) -> None:
    store.file_message(USER, "INBOX", mail("one"), internal_date=1)
    store.file_message(USER, "INBOX", mail("two"), internal_date=2)
    store.rename_folder(USER, "INBOX", "Old mail")
    assert store.messages(store.folder(USER, "INBOX").id) == []
    assert len(store.messages(store.folder(USER, "Old mail").id)) == 2


# -- exactly once ---------------------------------------------------------------------------


def test_seen_id_files_exactly_once(store: MailboxStore) -> None:
    first = store.file_message(USER, "INBOX", mail("x"), internal_date=1, seen_id=(b"m1", 100))
    again = store.file_message(USER, "INBOX", mail("x"), internal_date=1, seen_id=(b"m1", 100))
    assert first == 1
    assert again is None
    assert store.is_seen(USER, b"m1")
    assert not store.is_seen("bob", b"m1")
    assert len(store.messages(store.folder(USER, "INBOX").id)) == 1
    assert store.prune_seen(now=100) == 0
    assert store.prune_seen(now=101) == 1
    assert not store.is_seen(USER, b"m1")


def test_seen_id_is_not_recorded_when_filing_fails(store: MailboxStore) -> None:
    with pytest.raises(FolderNotFound):
        store.file_message(USER, "Nope", mail("x"), internal_date=1, seen_id=(b"m2", 100))
    assert not store.is_seen(USER, b"m2")


def test_sent_copies_with_one_message_id_are_filed_once(store: MailboxStore) -> None:
    synced = mail("report", "<r1@alice.onion>", b"from the other device\r\n")
    fcc = mail("report", "<r1@alice.onion>", b"Thunderbird's saved copy\r\n")
    uid = store.file_message(USER, "Sent", synced, internal_date=1, seen_id=(b"s1", 9))
    assert store.file_message(USER, "Sent", fcc, flags=["\\Seen"], internal_date=2) == uid
    sent = store.folder(USER, "Sent")
    [only] = store.messages(sent.id)
    assert only.flags == {"\\Seen"}
    assert store.file_message(USER, "Sent", mail("other", "<r2@alice.onion>"), internal_date=3)
    assert len(store.messages(sent.id)) == 2
    # The rule is for Sent only: INBOX keeps whatever arrives.
    store.file_message(USER, "INBOX", synced, internal_date=1)
    store.file_message(USER, "INBOX", synced, internal_date=1)
    assert len(store.messages(store.folder(USER, "INBOX").id)) == 2


# -- flags, copy, move, expunge, changes ------------------------------------------------------


def test_flags_keywords_and_change_tracking(store: MailboxStore) -> None:
    inbox = store.folder(USER, "INBOX")
    for i in range(3):
        store.file_message(USER, "INBOX", mail(f"m{i}"), internal_date=i, flags=["\\Seen"])
    start = store.modseq(inbox.id)
    assert start is not None
    [msg] = store.set_flags(inbox.id, [2], ["\\Flagged", "$label1", "\\Recent", "bad word"],
                            FlagOp.ADD)  # fmt: skip
    assert msg.flags == {"\\Seen", "\\Flagged", "$label1"}
    store.set_flags(inbox.id, [1, 2], ["\\Seen"], FlagOp.REMOVE)
    store.set_flags(inbox.id, [3], ["$Forwarded", "\\Answered"], FlagOp.REPLACE)
    status = store.status(inbox.id)
    assert (status.exists, status.unseen, status.first_unseen) == (3, 3, 1)
    assert status.keywords == {"$label1", "$Forwarded"}
    changes = store.changes(inbox.id, start)
    assert [m.uid for m in changes.updated] == [1, 2, 3]
    assert changes.expunged == []
    assert store.changes(inbox.id, changes.modseq).updated == []


def test_copy_shares_bytes_move_and_expunge_collect_them(store: MailboxStore) -> None:
    inbox, archive = store.folder(USER, "INBOX"), store.folder(USER, "Archive")
    big = mail("big", "<big@x>", body=os.urandom(1 << 20).hex().encode() + b"\r\n")
    store.file_message(USER, "INBOX", big, internal_date=1)
    assert store.copy(inbox.id, [1], archive.id) == [(1, 1)]
    bodies = {m.body_id for m in store.messages(inbox.id) + store.messages(archive.id)}
    assert len(bodies) == 1
    before = store.modseq(inbox.id) or 0
    assert store.move(inbox.id, [1, 99], archive.id) == [(1, 2)]
    assert store.changes(inbox.id, before).expunged == [1]
    [body_id] = bodies
    assert store.content(body_id) == big
    assert store.header(body_id) == big.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    store.set_flags(archive.id, [1, 2], ["\\Deleted"], FlagOp.ADD)
    assert store.deleted_uids(archive.id) == [1, 2]
    assert store.expunge(archive.id, [1, 2]) == [1, 2]
    assert store.content(body_id) == b""  # no message refers to it: gone


def test_recent_is_claimed_once(store: MailboxStore) -> None:
    inbox = store.folder(USER, "INBOX")
    store.file_message(USER, "INBOX", mail("a"), internal_date=1)
    store.file_message(USER, "INBOX", mail("b"), internal_date=1, recent=False)
    assert store.claim_recent(inbox.id) == [1]
    assert store.claim_recent(inbox.id) == []


def test_old_sessions_resynchronise_after_tombstones_are_pruned(store: MailboxStore) -> None:
    inbox = store.folder(USER, "INBOX")
    for i in range(40):
        store.file_message(USER, "INBOX", mail(f"{i}"), internal_date=i, normalize=False)
    old = store.modseq(inbox.id) or 0
    import onionpost.store.mailbox as module

    limit, module._MAX_TOMBSTONES = module._MAX_TOMBSTONES, 10
    try:
        for uid in range(1, 31):
            store.expunge(inbox.id, [uid])
    finally:
        module._MAX_TOMBSTONES = limit
    changes = store.changes(inbox.id, old)
    assert changes.full
    assert [m.uid for m in changes.updated] == list(range(31, 41))
    recent = store.changes(inbox.id, changes.modseq - 1)
    assert not recent.full


def test_filing_normalises_hostile_mail(store: MailboxStore) -> None:
    hostile = b"From: a@b.c\r\nSender: x@y.z, q@r.s\r\nSubject: hi\r\n\r\nbody\r\n"
    store.file_message(USER, "INBOX", hostile, internal_date=1_700_000_000)
    [msg] = store.messages(store.folder(USER, "INBOX").id)
    stored = store.content(msg.body_id)
    assert b"\r\nX-Original-Sender: x@y.z, q@r.s\r\n" in stored
    assert b"\r\nSender:" not in stored


def test_a_50_mib_message(store: MailboxStore) -> None:
    body = os.urandom(25 << 20).hex().encode()  # 50 MiB of text
    message = mail("huge", "<huge@x>", body)
    uid = store.file_message(USER, "INBOX", message, internal_date=1)
    [msg] = store.messages(store.folder(USER, "INBOX").id)
    assert msg.uid == uid
    assert store.size(msg.body_id) == len(message)
    assert len(store.header(msg.body_id)) < 300
    assert store.content(msg.body_id) == message


# -- listeners ------------------------------------------------------------------------------


def test_listeners_run_after_commit_only(store: MailboxStore) -> None:
    calls: list[tuple[str, str]] = []
    store.add_listener(lambda user, folder: calls.append((user, folder)))
    store.file_message(USER, "Archive", mail("x"), internal_date=1)
    assert calls == [(USER, "Archive")]
    calls.clear()
    db = store._db
    with pytest.raises(RuntimeError), db.transaction():
        store.file_message(USER, "INBOX", mail("y"), internal_date=1)
        assert calls == []  # not yet: the caller's transaction is still open
        raise RuntimeError("roll back")
    assert store.messages(store.folder(USER, "INBOX").id) == []
    with db.transaction():
        store.file_message(USER, "INBOX", mail("z"), internal_date=1)
    store.flush_notifications()
    assert (USER, "INBOX") in calls


# -- schema upgrades and crashes ------------------------------------------------------------


def test_migrations_upgrade_an_existing_database(db_path: Path) -> None:
    """A database written by the first schema version is upgraded in place, data kept."""
    with contextlib.closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL, "
            "name TEXT NOT NULL, applied_at INTEGER NOT NULL, PRIMARY KEY (component, version))"
        )
        version, name, sql = available_migrations("mailbox")[0]
        conn.executescript(sql)
        conn.execute("INSERT INTO schema_migrations VALUES ('mailbox', ?, ?, 0)", (version, name))
        conn.execute(
            "INSERT INTO mailbox_folders (user, name, uidvalidity, uidnext, created_at) "
            "VALUES ('alice', 'INBOX', 1234, 2, 0)"
        )
        conn.execute(
            "INSERT INTO mailbox_bodies (size, header_size, data) VALUES (3, 3, x'616263')"
        )
        conn.execute(
            "INSERT INTO mailbox_messages (folder_id, uid, body_id, internal_date, modseq) "
            "VALUES (1, 1, 1, 0, 1)"
        )

    db, store = reopen(db_path)
    try:
        assert db.schema_version("mailbox") == len(available_migrations("mailbox")) > 1
        inbox = store.folder(USER, "INBOX")
        assert inbox.uidvalidity == 1234
        assert [m.uid for m in store.messages(inbox.id)] == [1]
        store.ensure_user(USER)
        assert store.file_message(USER, "INBOX", mail("new"), internal_date=1,
                                  seen_id=(b"n", 9)) == 2  # fmt: skip
        assert store.is_seen(USER, b"n")
    finally:
        db.close()


_WRITER = textwrap.dedent(
    """
    import sys, time
    from onionpost.store.db import Database
    from onionpost.store.mailbox import MailboxStore
    db = Database(sys.argv[1], ["mailbox"])
    store = MailboxStore(db)
    store.ensure_user("alice")
    mode = sys.argv[2]
    filler = b"x" * (256 * 1024)
    if mode == "hold":
        with db.transaction():
            store.file_message("alice", "INBOX", b"Subject: held\\r\\n\\r\\n" + filler,
                               internal_date=1, seen_id=(b"held", 10**10))
            print("inside", flush=True)
            time.sleep(60)
    n = int(sys.argv[3])
    while True:
        n += 1
        msg = (b"Subject: n%d\\r\\nMessage-ID: <%d@x>\\r\\n" % (n, n)
               + b"Date: Mon, 01 Jan 2024 10:00:00 +0000\\r\\n\\r\\n" + filler)
        store.file_message("alice", "INBOX", msg, internal_date=n,
                           seen_id=(b"id%d" % n, 10**10))
        print(n, flush=True)
    """
)


def _run_writer(db_path: Path, mode: str, start: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(db_path), mode, str(start)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _reap(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _check_consistent(db_path: Path) -> tuple[int, set[int]]:
    """Invariants that must hold whenever the file is opened: returns (uidnext, numbers)."""
    db, store = reopen(db_path)
    try:
        assert db.scalar("PRAGMA integrity_check") == "ok"
        assert db.all("PRAGMA foreign_key_check") == []
        inbox = store.folder(USER, "INBOX")
        msgs = store.messages(inbox.id)
        numbers: set[int] = set()
        for msg in msgs:
            head = store.header(msg.body_id)
            assert head.startswith(b"Subject: n"), head[:40]
            number = int(head.split(b"\r\n")[0][10:])
            assert store.is_seen(USER, b"id%d" % number)
            numbers.add(number)
            assert msg.modseq <= inbox.modseq
        assert len(numbers) == len(msgs)  # every message exactly once
        seen = db.scalar("SELECT COUNT(*) FROM mailbox_seen_ids")
        assert seen == len(msgs)  # no id without its message
        assert db.scalar("SELECT COUNT(*) FROM mailbox_bodies") == len(msgs)
        assert not msgs or inbox.uidnext > max(m.uid for m in msgs)
        return inbox.uidnext, numbers
    finally:
        db.close()


def test_a_writer_killed_inside_a_transaction_leaves_nothing_half_done(db_path: Path) -> None:
    proc = _run_writer(db_path, "hold", 0)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "inside"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _reap(proc)
    db, store = reopen(db_path)
    try:
        assert not store.is_seen(USER, b"held")
        assert store.messages(store.folder(USER, "INBOX").id) == []
        assert store.folder(USER, "INBOX").uidnext == 1
    finally:
        db.close()


@pytest.mark.slow
def test_writers_killed_at_random_moments_leave_the_database_consistent(db_path: Path) -> None:
    uidnext, numbers = 1, set()
    for round_ in range(6):
        proc = _run_writer(db_path, "loop", 1000 * (round_ + 1))
        try:
            assert proc.stdout is not None
            for _ in range(3 + round_):  # let a few commits through, then kill mid-stream
                proc.stdout.readline()
            time.sleep(0.005 * round_)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            _reap(proc)
        next_uid, now_numbers = _check_consistent(db_path)
        assert next_uid >= uidnext
        assert numbers <= now_numbers  # nothing committed is ever lost
        uidnext, numbers = next_uid, now_numbers
    assert len(numbers) >= 6 * 3


def test_a_damaged_database_is_reported_with_what_to_do(tmp_path: Path) -> None:
    """A database missing tables it should have (a wrong or damaged file) is refused clearly."""
    import sqlite3

    from onionpost.errors import StoreError
    from onionpost.store.db import Database

    path = tmp_path / "device.db"
    Database(path, ("mailbox",)).close()
    # sqlite3's own context manager commits but does not close: closing() does.
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("DROP TABLE mailbox_messages")
    with pytest.raises(StoreError, match=r"mailbox_messages are missing\. Restore it"):
        Database(path, ("mailbox",))
