"""submissions 0003: a submission's message moves to a table of its own, intact."""

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
    finally:
        db.close()
