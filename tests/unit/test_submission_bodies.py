"""submissions 0003: a submission's message moves to a table of its own, intact; 0005: ids
are never given out twice, and an upgraded database keeps its submissions and recipients."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.db import Database
from onionpost.store.submissions import SubmissionStore

MIGRATIONS = Path(__file__).parents[2] / "onionpost" / "store" / "migrations" / "submissions"


def test_an_old_submission_keeps_its_message(tmp_path: Path) -> None:
    path = tmp_path / "device.db"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL,"
        " name TEXT NOT NULL, applied_at INTEGER NOT NULL, PRIMARY KEY (component, version))"
    )
    for version, name in ((1, "0001_initial"), (2, "0002_created_index")):
        conn.executescript((MIGRATIONS / f"{name}.sql").read_text())
        conn.execute(
            "INSERT INTO schema_migrations VALUES ('submissions', ?, ?, 0)", (version, name)
        )
    conn.execute(
        "INSERT INTO submissions (id, user, message, headers, created_at, expires_at)"
        " VALUES (7, 'alice', ?, x'', 0, 9999999999), (8, 'alice', x'', x'', 0, 9999999999)",
        (b"Subject: old\r\n\r\nbody\r\n",),
    )
    conn.execute(
        "INSERT INTO submission_recipients (submission_id, address, state, next_attempt_at,"
        " outbox_id) VALUES (7, 'bob@x', 'queued', 5, 41), (8, 'carol@x', 'delivered', 5, 42)"
    )
    conn.commit()
    conn.close()
    db = Database(path, DEVICE_COMPONENTS)
    try:
        store = SubmissionStore(db)
        assert store.message(7) == b"Subject: old\r\n\r\nbody\r\n"
        assert store.message(8) == b""  # finished: its message was forgotten already
        with db.transaction():
            sid = store.add(
                user="alice", message=b"new", headers=b"", recipients=["x"],
                message_ref="", now=1, expires_at=2,
            )  # fmt: skip
        assert store.message(sid) == b"new"
        assert sid > 8
        recipients = db.all(
            "SELECT submission_id, address, state, outbox_id FROM submission_recipients"
            " ORDER BY submission_id"
        )
        assert [tuple(r) for r in recipients] == [
            (7, "bob@x", "queued", 41),
            (8, "carol@x", "delivered", 42),
            (sid, "x", "pending", None),
        ]
    finally:
        db.close()


def test_a_submission_id_is_never_reused(tmp_path: Path) -> None:
    """The sealing job holds submission ids across its awaits; a person removed meanwhile
    (the CLI, another process) deletes theirs.  The next submission must not take a deleted
    id, or the job's marks for the deleted one could land on it."""
    db = Database(tmp_path / "device.db", DEVICE_COMPONENTS)
    try:
        store = SubmissionStore(db)

        def submit(user: str) -> int:
            with db.transaction():
                return store.add(
                    user=user, message=b"m", headers=b"", recipients=["bob@x"],
                    message_ref="", now=1, expires_at=2,
                )  # fmt: skip

        kept, gone = submit("alice"), submit("zed")
        db.write("DELETE FROM submissions WHERE id = ?", (gone,))
        assert submit("alice") > gone > kept
    finally:
        db.close()
