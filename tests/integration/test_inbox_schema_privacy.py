"""The inbox stores what it must and no more, and docs/threat-model.md says exactly what.

* The section "What the inbox database holds" lists every table and column of a freshly
  migrated ``inbox.db``, no more and no fewer, so the document and the schema cannot drift.
* After real deliveries in both directions (SMTP-like submission, sealing, the outbox, the
  destination inbox, sync), neither inbox's database file nor its WAL contains a sender's or
  recipient's address, the other side's local part, the Message-ID or the message id.
* An inbox created by an older version is upgraded in place: clear values become keyed
  hashes, dropped columns go, and queued mail, duplicates and tokens keep working.
"""

from __future__ import annotations

import re
import sqlite3
import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from onionpost.base.clock import FakeClock
from onionpost.core.crypto.keys import ServerSecrets, record_hash
from onionpost.core.errors import StoreError
from onionpost.net.transport import DirectDialer
from onionpost.store import INBOX_COMPONENTS
from onionpost.store.db import Database, available_migrations
from onionpost.store.inbox import InboxStore
from onionpost.store.outbox import OutboxStore
from onionpost.testing.harness import DeviceNode, InboxNode

DOC = Path(__file__).resolve().parents[2] / "docs" / "threat-model.md"
SECTION = "## What the inbox database holds"
HOLDS = {"clear", "keyed hash", "hash", "ciphertext"}
KEY = b"k" * 32


def documented() -> dict[tuple[str, str], str]:
    """(table, column) -> what it holds, from the table in docs/threat-model.md."""
    text = DOC.read_text(encoding="utf-8")
    assert SECTION in text, f"docs/threat-model.md has no section '{SECTION}'"
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, str], str] = {}
    for line in body.splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*`(\w+)`\s*\|\s*([^|]+?)\s*\|\s*(.+?)\s*\|\s*$", line)
        if m is None:
            continue
        table, column, holds, why = m.groups()
        assert (table, column) not in rows, f"{table}.{column} is listed twice"
        assert holds in HOLDS, f"{table}.{column}: '{holds}' is not one of {sorted(HOLDS)}"
        assert why, f"{table}.{column}: say why it is stored"
        rows[(table, column)] = holds
    assert rows, "the section lists no columns"
    return rows


def schema(db: Database) -> set[tuple[str, str]]:
    tables = [
        r[0]
        for r in db.all(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {(t, r[1]) for t in tables for r in db.all(f"PRAGMA table_info({t})")}


def test_the_threat_model_lists_exactly_the_inbox_schema(tmp_path: Path) -> None:
    db = Database(tmp_path / "inbox.db", INBOX_COMPONENTS, record_key=KEY)
    try:
        actual = schema(db)
    finally:
        db.close()
    listed = set(documented())
    assert not actual - listed, f"columns missing from docs/threat-model.md: {actual - listed}"
    assert not listed - actual, f"documented columns not in the schema: {listed - actual}"


# --- a real delivery leaves no addresses behind -------------------------------------------------

ALICE, BOB = "quillfeather", "brambleton"  # local parts that cannot occur by chance


def compose(sender: DeviceNode, to: DeviceNode, subject: str, message_id: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = str(sender.address)
    msg["To"] = str(to.address)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg.set_content(f"body of {subject}")
    return msg.as_bytes()


def files_of(node: InboxNode) -> bytes:
    """The raw bytes of an inbox's database, its WAL and shared memory file."""
    base = node.dir / "inbox.db"
    return b"".join(
        p.read_bytes() for p in (base, Path(f"{base}-wal"), Path(f"{base}-shm")) if p.exists()
    )


async def test_a_delivery_leaves_no_address_or_message_id_in_either_inbox(
    tmp_path: Path,
) -> None:
    clock = FakeClock(int(time.time()))
    dialer = DirectDialer()
    a = InboxNode(tmp_path, "inbox-a", clock, dialer)
    b = InboxNode(tmp_path, "inbox-b", clock, dialer)
    alice = DeviceNode(tmp_path, "alice", a.provision(ALICE), clock, dialer)
    bob = DeviceNode(tmp_path, "bob", b.provision(BOB), clock, dialer)
    await a.start(worker=False)
    await b.start(worker=False)
    ids = ["<first-7d1c0ffee@quill.example>", "<reply-5eabadcafe@bramble.example>"]
    try:
        alice.submissions.submit(ALICE, [bob.address], compose(alice, bob, "first contact", ids[0]))
        await alice.submissions.process_due()
        await a.worker.run_due()
        spooled = files_of(b)  # sealed at bob's inbox, not fetched yet
        await bob.device.sync()
        bob.submissions.submit(BOB, [alice.address], compose(bob, alice, "the reply", ids[1]))
        await bob.submissions.process_due()  # with a token alice's device granted
        await b.worker.run_due()
        await alice.device.sync()
        await alice.submissions.check_outbox(alice.device)
        await bob.submissions.check_outbox(bob.device)
        assert [r.state for r in a.inbox.outbox.rows(states=("delivered",))]
        assert [r.state for r in b.inbox.outbox.rows(states=("delivered",))]
        msg_ids = [
            bytes(r[0])
            for d in (alice, bob)
            for r in d.db.all("SELECT msg_id FROM mailbox_seen_ids")
        ]
        assert len(msg_ids) >= 2
        a.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        b.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        raw = {"inbox-a": files_of(a), "inbox-b": files_of(b) + spooled}
    finally:
        await alice.close()
        await bob.close()
        await a.stop()
        await b.stop()
        a.close()
        b.close()

    # Each inbox holds its own user's local part (the mailbox's public name), nothing more.
    forbidden = {
        "inbox-a": [str(alice.address), str(bob.address), BOB, *ids],
        "inbox-b": [str(alice.address), str(bob.address), ALICE, *ids],
    }
    for name, data in raw.items():
        lowered = data.lower()
        for text in forbidden[name]:
            for form in (text.encode(), text.encode("utf-16-le")):
                assert form.lower() not in lowered, f"{name} holds {text!r} in clear"
        for msg_id in msg_ids:
            assert msg_id not in data and msg_id.hex().encode() not in lowered, (
                f"{name} holds a message id"
            )
    assert ALICE.encode() in raw["inbox-a"]  # the check above would have found it


# --- upgrading an existing inbox ----------------------------------------------------------------

OLD = {"inbox": 2, "outbox": 1, "enrolment": 1}


def old_inbox(path: Path) -> None:
    """An inbox database as the version before minimisation left it, with clear values."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL,"
        " name TEXT NOT NULL, applied_at INTEGER NOT NULL, PRIMARY KEY (component, version))"
    )
    for component, last in OLD.items():
        for version, name, sql in available_migrations(component):
            if version <= last:
                conn.executescript(sql)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?, 0)", (component, version, name)
                )
    mb = b"M" * 16
    conn.execute(
        "INSERT INTO mailboxes (mailbox_id, local, uik_pk, binding, device_list,"
        " device_list_version, created_at) VALUES (?, 'alice', x'00', x'00', x'', 0, 0)",
        (mb,),
    )
    conn.execute(
        "INSERT INTO tokens VALUES (?, ?, 'carol@example.onion', 0, NULL)", (mb, b"T" * 32)
    )
    conn.execute("INSERT INTO seen_digests VALUES (?, ?, 'r1', 9999999999)", (mb, b"D" * 32))
    conn.execute(
        "INSERT INTO sealed (mailbox_id, digest, size, received_at, expires_at, data)"
        " VALUES (?, ?, 1, 0, 9999999999, x'00')",
        (mb, b"E" * 32),
    )
    onion = "a" * 56
    for n, state in ((1, "queued"), (2, "delivered")):
        conn.execute(
            "INSERT INTO outbox (id, mailbox_id, device_id, destination, msg_id, digest, envelope,"
            " message_ref, submission_key, created_at, expires_at, next_attempt_at, state,"
            " receipt) VALUES (?, ?, ?, ?, ?, ?, x'01', '<old@x>', ?, 0, 9999999999, 0, ?, 'r')",
            (n, mb, b"d" * 16, f"bob@{onion}.onion", b"i" * 16, b"g" * 32, f"dev:k{n}", state),
        )
    conn.commit()
    conn.close()


def test_an_old_inbox_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "inbox.db"
    old_inbox(path)
    with pytest.raises(StoreError, match=r"needs the inbox's key"):
        Database(path, INBOX_COMPONENTS)  # the hashes cannot be made without the key
    db = Database(path, INBOX_COMPONENTS, record_key=KEY)
    try:
        assert schema(db) == set(documented())
        mb = b"M" * 16
        store, outbox = InboxStore(db), OutboxStore(db)
        assert store.token_valid(mb, b"T" * 32)  # already a keyed hash: kept as it was
        assert store.seen(mb, b"D" * 32)  # a duplicate is still recognised
        assert db.scalar("SELECT digest FROM sealed") == record_hash(KEY, b"E" * 32)
        assert store.usage(mb) == 1  # the usage row starts from the mail already there
        (queued,) = outbox.rows()
        assert queued.id == 1 and queued.onion == "a" * 56
        (done,) = outbox.rows(states=("delivered",))
        assert done.onion == ""
        # the device's idempotency key still finds its row
        assert (
            outbox.enqueue(
                mailbox_id=mb,
                device_id=b"d" * 16,
                onion="a" * 56,
                envelope=b"again",
                submission_key="dev:k1",
                now=1,
                expires_at=2,
            )
            == 1
        )
        assert db.scalar("SELECT count(*) FROM outbox") == 2
    finally:
        db.close()
    # The converted values are gone from the file itself, not only from the live rows: the
    # upgrade compacts the database (VACUUM), so no freed page keeps the clear bytes.
    data = b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())
    for clear in (b"dev:k1", b"carol@example.onion", b"<old@x>", b"bob@", b"i" * 16, b"D" * 32):
        assert clear not in data, clear


def test_the_record_key_is_the_inbox_s_own() -> None:
    one, two = ServerSecrets.generate(0), ServerSecrets.generate(0)
    assert one.record_key() != two.record_key()
    assert one.record_key() == ServerSecrets.parse(one.encode()).record_key()
