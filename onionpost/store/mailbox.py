"""The device's decrypted mailbox: folders, messages with stable UIDs, flags, and seen ids.

This is what the IMAP gateway serves and what :mod:`onionpost.sync` files into.  Three
promises shape it:

* **Exactly once.**  :meth:`MailboxStore.file_message` records the sender's message id in
  the same transaction as the message, so a crash before the inbox is told to drop its copy
  repeats the work without filing a duplicate.
* **Stable UIDs.**  UIDs only grow within a folder and UIDVALIDITY comes from a counter that
  never repeats, so a mail client's cache stays valid across restarts.  Every change bumps
  the folder's mod-sequence and expunged UIDs leave tombstones, so an IMAP session asks
  "what changed since N?" with one indexed query instead of reloading the folder.
* **No client chokes.**  Filed mail goes through :func:`onionpost.normalize.normalize`.

All of it is plain SQL on the shared :class:`~onionpost.store.db.Database`; message bytes
live in ``mailbox_bodies``, shared by copies, and headers can be read without the body.
Calls are synchronous and meant for the event-loop thread that owns the database.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from onionpost.errors import (
    FolderExists,
    FolderNotFound,
    FolderProtected,
    InvalidFolderName,
)
from onionpost.normalize import message_id as header_message_id
from onionpost.normalize import normalize as normalize_message
from onionpost.store.db import Database, translate

__all__ = [
    "STANDARD_FOLDERS",
    "Changes",
    "FlagOp",
    "Folder",
    "FolderStatus",
    "MailboxStore",
    "StoredMessage",
]

log = logging.getLogger(__name__)

DELIMITER = "/"
#: Created for every user; the special-use attribute (RFC 6154) tells clients what each is for.
STANDARD_FOLDERS: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
    ("Archive", "\\Archive"),
)
_STANDARD_NAMES = frozenset(name for name, _ in STANDARD_FOLDERS)

_SYSTEM_FLAGS = {"\\seen": 1, "\\answered": 2, "\\flagged": 4, "\\deleted": 8, "\\draft": 16}
_FLAG_NAMES = {bit: f"\\{name[1:].capitalize()}" for name, bit in _SYSTEM_FLAGS.items()}
SEEN, DELETED = 1, 8
_KEYWORD = re.compile(r"[!#$&'+\-.0-9:;<=>?@A-Z\[^_`a-z|}~]+")
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f*%]")
_MAX_LEVELS = 32  # pymap walks the folder tree recursively
#: Tombstones kept per folder; older ones are pruned and sessions behind them resynchronise.
_MAX_TOMBSTONES = 5000

Listener = Callable[[str, str], None]


class FlagOp(enum.Enum):
    ADD = "add"
    REMOVE = "remove"
    REPLACE = "replace"


@dataclass(frozen=True, slots=True)
class Folder:
    id: int
    user: str
    name: str
    special_use: str | None
    uidvalidity: int
    uidnext: int
    modseq: int
    subscribed: bool


@dataclass(frozen=True, slots=True)
class StoredMessage:
    uid: int
    body_id: int
    internal_date: int
    flags: frozenset[str]
    recent: bool
    modseq: int


@dataclass(frozen=True, slots=True)
class FolderStatus:
    exists: int
    recent: int
    unseen: int
    first_unseen: int | None  # a sequence number, as IMAP's [UNSEEN n] wants
    uidnext: int
    uidvalidity: int
    modseq: int
    keywords: frozenset[str]


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed in a folder since a mod-sequence; ``full`` means "resynchronise"."""

    updated: list[StoredMessage]
    expunged: list[int]
    modseq: int
    full: bool


def flags_to_columns(flags: Iterable[str]) -> tuple[int, str]:
    """(system-flag bits, keyword text); \\Recent and unknown or malformed flags are dropped."""
    bits = 0
    keywords: set[str] = set()
    for flag in flags:
        if flag.startswith("\\"):
            bits |= _SYSTEM_FLAGS.get(flag.lower(), 0)
        elif _KEYWORD.fullmatch(flag):
            keywords.add(flag)
    return bits, " ".join(sorted(keywords))


def columns_to_flags(bits: int, keywords: str) -> frozenset[str]:
    names = [name for bit, name in _FLAG_NAMES.items() if bits & bit]
    return frozenset(names + keywords.split())


def _message(row: sqlite3.Row) -> StoredMessage:
    return StoredMessage(
        row["uid"],
        row["body_id"],
        row["internal_date"],
        columns_to_flags(row["sysflags"], row["keywords"]),
        bool(row["recent"]),
        row["modseq"],
    )


def _folder(row: sqlite3.Row) -> Folder:
    return Folder(
        row["id"],
        row["user"],
        row["name"],
        row["special_use"],
        row["uidvalidity"],
        row["uidnext"],
        row["modseq"],
        bool(row["subscribed"]),
    )


def canonical_name(name: str) -> str:
    """Validate a folder name; INBOX (and its children's prefix) in any case becomes "INBOX"."""
    if not name or len(name) > 500 or _BAD_NAME.search(name):
        raise InvalidFolderName()
    parts = name.split(DELIMITER)
    if any(not part for part in parts) or len(parts) > _MAX_LEVELS:
        raise InvalidFolderName()
    if parts[0].upper() == "INBOX":
        parts[0] = "INBOX"
    return DELIMITER.join(parts)


def _ids(ids: Iterable[int]) -> str:
    """Ids as one JSON array parameter for ``IN (SELECT value FROM json_each(?))``: any number
    of them in one statement, without building SQL text from data."""
    return json.dumps(sorted({int(i) for i in ids}))


class MailboxStore:
    """Folders and messages of every local user, in ``device.db``."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._listeners: list[Listener] = []
        self._pending: set[tuple[str, str]] = set()
        self._lock = threading.RLock()
        self._envelopes: dict[int, bytes] = {}

    # -- change notification ------------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(user, folder)`` after each commit that adds or changes messages.

        The IMAP server uses this to wake IDLE sessions at once instead of polling.
        Callbacks run in the writer's thread and must be quick and must not raise.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    def flush_notifications(self) -> None:
        """Deliver notifications held back while a caller's own transaction was open."""
        self._flush()

    def _changed(self, user: str, folder: str) -> None:
        self._pending.add((user, folder))

    def _flush(self) -> None:
        """Tell listeners about committed changes (not while a caller's transaction is open)."""
        if self._db.conn.in_transaction or not self._pending:
            return
        pending, self._pending = self._pending, set()
        for user, folder in sorted(pending):
            for callback in list(self._listeners):
                try:
                    callback(user, folder)
                except Exception:  # a listener's bug must not undo a committed change
                    log.exception("mailbox listener failed")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several filings into one commit (listeners are told after it)."""
        with self._write():
            yield

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                with self._db.transaction() as conn:
                    yield conn
            except sqlite3.Error as exc:
                self._pending.clear()
                raise translate(exc) from exc
            except BaseException:
                if not self._db.conn.in_transaction:
                    self._pending.clear()
                raise
            self._flush()

    # -- folders -------------------------------------------------------------------------

    def ensure_user(self, user: str) -> None:
        """Create the standard folders of ``user`` that do not exist yet."""
        have = {
            r[0] for r in self._db.all("SELECT name FROM mailbox_folders WHERE user = ?", (user,))
        }
        if have.issuperset(_STANDARD_NAMES):
            return  # the usual case, at every login: no write transaction needed
        with self._write() as conn:
            for name, special_use in STANDARD_FOLDERS:
                exists = conn.execute(
                    "SELECT 1 FROM mailbox_folders WHERE user = ? AND name = ?", (user, name)
                ).fetchone()
                if not exists:
                    self._insert_folder(conn, user, name, special_use)

    def users(self) -> list[str]:
        return [r[0] for r in self._db.all("SELECT DISTINCT user FROM mailbox_folders")]

    def remove_user(self, user: str) -> int:
        """Delete ``user``'s folders, messages and filed-message ids (the user is being
        removed); returns how many messages went.  Bodies shared with nobody else go too."""
        with self._write() as conn:
            body_ids = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT m.body_id FROM mailbox_messages m"
                    " JOIN mailbox_folders f ON f.id = m.folder_id WHERE f.user = ?",
                    (user,),
                )
            ]
            gone = conn.execute(
                "DELETE FROM mailbox_messages WHERE folder_id IN"
                " (SELECT id FROM mailbox_folders WHERE user = ?)",
                (user,),
            ).rowcount
            conn.execute("DELETE FROM mailbox_folders WHERE user = ?", (user,))
            conn.execute("DELETE FROM mailbox_seen_ids WHERE user = ?", (user,))
            self._collect_bodies(conn, body_ids)
            return int(gone)

    def folders(self, user: str) -> list[Folder]:
        rows = self._db.all("SELECT * FROM mailbox_folders WHERE user = ? ORDER BY name", (user,))
        return [_folder(r) for r in rows]

    def folder(self, user: str, name: str) -> Folder:
        row = self._db.one(
            "SELECT * FROM mailbox_folders WHERE user = ? AND name = ?",
            (user, canonical_name(name)),
        )
        if row is None:
            raise FolderNotFound(f"There is no folder named {name!r}.")
        return _folder(row)

    def folder_by_id(self, folder_id: int) -> Folder | None:
        row = self._db.one("SELECT * FROM mailbox_folders WHERE id = ?", (folder_id,))
        return _folder(row) if row else None

    def modseq(self, folder_id: int) -> int | None:
        """The folder's highest mod-sequence (None if it was deleted): a cheap "anything new?"."""
        value = self._db.scalar("SELECT modseq FROM mailbox_folders WHERE id = ?", (folder_id,))
        return None if value is None else int(value)

    def create_folder(self, user: str, name: str) -> Folder:
        name = canonical_name(name)
        if name == "INBOX":
            raise FolderExists()
        with self._write() as conn:
            if conn.execute(
                "SELECT 1 FROM mailbox_folders WHERE user = ? AND name = ?", (user, name)
            ).fetchone():
                raise FolderExists(f"A folder named {name!r} already exists.")
            folder_id = self._insert_folder(conn, user, name, None)
        created = self.folder_by_id(folder_id)
        assert created is not None
        return created

    def delete_folder(self, user: str, name: str) -> None:
        """Delete a folder and its messages; its subfolders stay (shown as \\Noselect)."""
        folder = self.folder(user, name)
        if folder.name in _STANDARD_NAMES:
            raise FolderProtected()
        with self._write() as conn:
            body_ids = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT body_id FROM mailbox_messages WHERE folder_id = ?",
                    (folder.id,),
                )
            ]
            conn.execute("DELETE FROM mailbox_messages WHERE folder_id = ?", (folder.id,))
            conn.execute("DELETE FROM mailbox_folders WHERE id = ?", (folder.id,))
            self._collect_bodies(conn, body_ids)
            self._changed(user, folder.name)

    def rename_folder(self, user: str, old: str, new: str) -> None:
        """Rename a folder with its subfolders; renaming INBOX moves its messages (RFC 3501)."""
        old, new = canonical_name(old), canonical_name(new)
        if new == "INBOX" or new.startswith(old + DELIMITER):
            raise InvalidFolderName(f"A folder cannot be renamed to {new!r}.")
        if old == "INBOX":
            self._rename_inbox(user, new)
            return
        with self._write() as conn:
            rows = conn.execute(
                "SELECT id, name FROM mailbox_folders WHERE user = ? AND (name = ? OR "
                "substr(name, 1, ?) = ?)",
                (user, old, len(old) + 1, old + DELIMITER),
            ).fetchall()
            if not rows:
                raise FolderNotFound(f"There is no folder named {old!r}.")
            if any(r["name"] in _STANDARD_NAMES for r in rows):
                raise FolderProtected()
            for row in rows:
                target = new + row["name"][len(old) :]
                if conn.execute(
                    "SELECT 1 FROM mailbox_folders WHERE user = ? AND name = ?", (user, target)
                ).fetchone():
                    raise FolderExists(f"A folder named {target!r} already exists.")
            for row in rows:
                target = new + row["name"][len(old) :]
                conn.execute(
                    "UPDATE mailbox_folders SET name = ? WHERE id = ?", (target, row["id"])
                )
                self._changed(user, row["name"])
                self._changed(user, target)

    def _rename_inbox(self, user: str, new: str) -> None:
        inbox = self.folder(user, "INBOX")
        with self._write():
            target = self.create_folder(user, new)
            uids = [m.uid for m in self.messages(inbox.id)]
            self.move(inbox.id, uids, target.id)

    def set_subscribed(self, user: str, name: str, subscribed: bool) -> None:
        folder = self.folder(user, name)
        with self._write() as conn:
            conn.execute(
                "UPDATE mailbox_folders SET subscribed = ? WHERE id = ?", (subscribed, folder.id)
            )

    def _insert_folder(
        self, conn: sqlite3.Connection, user: str, name: str, special_use: str | None
    ) -> int:
        now = int(time.time())
        last = conn.execute(
            "SELECT value FROM mailbox_counters WHERE name = 'uidvalidity'"
        ).fetchone()
        # Time-based and strictly increasing: never reused, even for a re-created name, and
        # still larger than before if the database is ever re-created from scratch.
        uidvalidity = max(now, (last[0] if last else 0) + 1) & 0xFFFFFFFF or 1
        conn.execute(
            "INSERT INTO mailbox_counters (name, value) VALUES ('uidvalidity', ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (uidvalidity,),
        )
        cur = conn.execute(
            "INSERT INTO mailbox_folders (user, name, special_use, uidvalidity, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (user, name, special_use, uidvalidity, now),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    # -- filing ----------------------------------------------------------------------------

    def file_message(
        self,
        user: str,
        folder: str,
        message: bytes,
        *,
        flags: Iterable[str] = (),
        internal_date: int,
        seen_id: tuple[bytes, int] | None = None,
        recent: bool = True,
        normalize: bool = True,
    ) -> int | None:
        """File ``message`` into ``folder``; return its UID.

        ``seen_id=(msg_id, expires_at)`` makes filing exactly-once: if the id was recorded
        for this user nothing is filed and None is returned, otherwise it is recorded in the
        same transaction as the message.  In the \\Sent folder a message whose Message-ID is
        already there is not filed again; the existing UID is returned (its flags gain
        ``flags``), so a client's Fcc copy and the copy synced from another device are one.
        ``normalize=False`` is for bytes that are already normalised (and for tests).
        """
        if normalize:
            message = normalize_message(message, now=internal_date)
        bits, keywords = flags_to_columns(flags)
        msg_id = header_message_id(message)
        with self._write() as conn:
            if seen_id is not None:
                if conn.execute(
                    "SELECT 1 FROM mailbox_seen_ids WHERE user = ? AND msg_id = ?",
                    (user, seen_id[0]),
                ).fetchone():
                    return None
                conn.execute(
                    "INSERT INTO mailbox_seen_ids (user, msg_id, expires_at) VALUES (?, ?, ?)",
                    (user, seen_id[0], seen_id[1]),
                )
            row = conn.execute(
                "SELECT * FROM mailbox_folders WHERE user = ? AND name = ?",
                (user, canonical_name(folder)),
            ).fetchone()
            if row is None:
                raise FolderNotFound(f"There is no folder named {folder!r}.")
            target = _folder(row)
            if target.special_use == "\\Sent" and msg_id is not None:
                existing = conn.execute(
                    "SELECT uid, sysflags, keywords FROM mailbox_messages "
                    "WHERE folder_id = ? AND message_id = ? ORDER BY uid LIMIT 1",
                    (target.id, msg_id),
                ).fetchone()
                if existing is not None:
                    self._merge_flags(conn, target, existing, bits, keywords)
                    return int(existing["uid"])
            header_size = message.find(b"\r\n\r\n")
            header_size = len(message) if header_size < 0 else header_size + 4
            body = conn.execute(
                "INSERT INTO mailbox_bodies (size, header_size, data) VALUES (?, ?, ?)",
                (len(message), header_size, message),
            ).lastrowid
            modseq = self._bump(conn, target.id)
            uid = self._next_uids(conn, target.id, 1)
            conn.execute(
                "INSERT INTO mailbox_messages (folder_id, uid, body_id, internal_date, sysflags, "
                "keywords, recent, modseq, message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (target.id, uid, body, internal_date, bits, keywords, recent, modseq, msg_id),
            )
            self._changed(user, target.name)
        return uid

    def _merge_flags(
        self, conn: sqlite3.Connection, folder: Folder, row: sqlite3.Row, bits: int, keywords: str
    ) -> None:
        merged_bits = row["sysflags"] | bits
        merged_keywords = " ".join(sorted(set(row["keywords"].split()) | set(keywords.split())))
        if merged_bits == row["sysflags"] and merged_keywords == row["keywords"]:
            return
        modseq = self._bump(conn, folder.id)
        conn.execute(
            "UPDATE mailbox_messages SET sysflags = ?, keywords = ?, modseq = ? "
            "WHERE folder_id = ? AND uid = ?",
            (merged_bits, merged_keywords, modseq, folder.id, row["uid"]),
        )
        self._changed(folder.user, folder.name)

    def is_seen(self, user: str, msg_id: bytes) -> bool:
        return bool(
            self._db.scalar(
                "SELECT 1 FROM mailbox_seen_ids WHERE user = ? AND msg_id = ?", (user, msg_id)
            )
        )

    def prune_seen(self, now: int) -> int:
        """Forget message ids whose lifetime has ended (a replay would be refused as expired)."""
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM mailbox_seen_ids WHERE expires_at < ?", (now,)
            ).rowcount

    # -- reading -------------------------------------------------------------------------

    def status(self, folder_id: int) -> FolderStatus:
        folder = self.folder_by_id(folder_id)
        if folder is None:
            raise FolderNotFound()
        row = self._db.one(
            "SELECT COUNT(*) AS n, COALESCE(SUM(recent), 0) AS r, "
            "COALESCE(SUM((sysflags & ?) = 0), 0) AS u, "
            "MIN(CASE WHEN (sysflags & ?) = 0 THEN uid END) AS first_uid "
            "FROM mailbox_messages WHERE folder_id = ?",
            (SEEN, SEEN, folder_id),
        )
        assert row is not None
        first_unseen = None
        if row["first_uid"] is not None:
            first_unseen = 1 + int(
                self._db.scalar(
                    "SELECT COUNT(*) FROM mailbox_messages WHERE folder_id = ? AND uid < ?",
                    (folder_id, row["first_uid"]),
                )
            )
        keywords: set[str] = set()
        for (text,) in self._db.all(
            "SELECT DISTINCT keywords FROM mailbox_messages WHERE folder_id = ? AND keywords != ''",
            (folder_id,),
        ):
            keywords.update(text.split())
        return FolderStatus(
            row["n"],
            row["r"],
            row["u"],
            first_unseen,
            folder.uidnext,
            folder.uidvalidity,
            folder.modseq,
            frozenset(keywords),
        )

    def messages(self, folder_id: int) -> list[StoredMessage]:
        """Metadata (no bytes) of every message in the folder, by UID."""
        rows = self._db.all(
            "SELECT uid, body_id, internal_date, sysflags, keywords, recent, modseq "
            "FROM mailbox_messages WHERE folder_id = ? ORDER BY uid",
            (folder_id,),
        )
        return [_message(r) for r in rows]

    def messages_by_uid(self, folder_id: int, uids: Sequence[int]) -> dict[int, StoredMessage]:
        rows = self._db.all(
            "SELECT uid, body_id, internal_date, sysflags, keywords, recent, modseq "
            "FROM mailbox_messages WHERE folder_id = ? AND uid IN (SELECT value FROM json_each(?))",
            (folder_id, _ids(uids)),
        )
        return {row["uid"]: _message(row) for row in rows}

    def changes(self, folder_id: int, since: int) -> Changes:
        """Messages added or changed, and UIDs expunged, after mod-sequence ``since``."""
        row = self._db.one(
            "SELECT modseq, expunge_floor FROM mailbox_folders WHERE id = ?", (folder_id,)
        )
        if row is None:
            raise FolderNotFound()
        if since < row["expunge_floor"]:
            return Changes(self.messages(folder_id), [], row["modseq"], full=True)
        updated = self._db.all(
            "SELECT uid, body_id, internal_date, sysflags, keywords, recent, modseq "
            "FROM mailbox_messages WHERE folder_id = ? AND modseq > ? ORDER BY uid",
            (folder_id, since),
        )
        expunged = self._db.all(
            "SELECT uid FROM mailbox_expunged WHERE folder_id = ? AND modseq > ?",
            (folder_id, since),
        )
        return Changes(
            [_message(r) for r in updated], [r[0] for r in expunged], row["modseq"], full=False
        )

    def content(self, body_id: int) -> bytes:
        data = self._db.scalar("SELECT data FROM mailbox_bodies WHERE id = ?", (body_id,))
        return bytes(data) if data is not None else b""

    def header(self, body_id: int) -> bytes:
        """Only the header block (and its blank line): a 50 MiB message costs a few KiB here."""
        data = self._db.scalar(
            "SELECT substr(data, 1, header_size) FROM mailbox_bodies WHERE id = ?", (body_id,)
        )
        return bytes(data) if data is not None else b""

    def cached_envelope(self, body_id: int) -> bytes | None:
        """The IMAP gateway's rendering of this body's ENVELOPE, if it was kept."""
        pending = self._envelopes.get(body_id)
        if pending is not None:
            return pending
        data = self._db.scalar("SELECT data FROM mailbox_envelopes WHERE body_id = ?", (body_id,))
        return bytes(data) if data is not None else None

    def cache_envelope(self, body_id: int, data: bytes) -> None:
        """Keep a rendered ENVELOPE; written with the next :meth:`flush_cache` (one commit
        for many, since a first sync renders thousands)."""
        self._envelopes[body_id] = data
        if len(self._envelopes) >= 1024:
            self.flush_cache()

    def bodies_without_envelope(self, limit: int) -> list[int]:
        """Bodies whose ENVELOPE has not been rendered yet (newest first: likely read first)."""
        return [
            int(r[0])
            for r in self._db.all(
                "SELECT b.id FROM mailbox_bodies b LEFT JOIN mailbox_envelopes e"
                " ON e.body_id = b.id WHERE e.body_id IS NULL ORDER BY b.id DESC LIMIT ?",
                (limit,),
            )
        ]

    def flush_cache(self) -> None:
        if not self._envelopes:
            return
        items, self._envelopes = self._envelopes, {}
        with self._write() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO mailbox_envelopes (body_id, data) "
                "SELECT ?, ? WHERE EXISTS (SELECT 1 FROM mailbox_bodies WHERE id = ?)",
                [(body_id, data, body_id) for body_id, data in items.items()],
            )

    def size(self, body_id: int) -> int:
        return int(self._db.scalar("SELECT size FROM mailbox_bodies WHERE id = ?", (body_id,)) or 0)

    def deleted_uids(self, folder_id: int) -> list[int]:
        rows = self._db.all(
            "SELECT uid FROM mailbox_messages WHERE folder_id = ? AND (sysflags & ?) != 0 "
            "ORDER BY uid",
            (folder_id, DELETED),
        )
        return [r[0] for r in rows]

    # -- changing ------------------------------------------------------------------------

    def set_flags(
        self, folder_id: int, uids: Sequence[int], flags: Iterable[str], op: FlagOp
    ) -> list[StoredMessage]:
        """Change flags; return the messages as they are now (those that still exist)."""
        bits, keywords = flags_to_columns(flags)
        words = set(keywords.split())
        folder = self._existing(folder_id)
        with self._write() as conn:
            current = self.messages_by_uid(folder_id, uids)
            changed: list[tuple[int, str, int]] = []
            for uid, msg in current.items():
                old_bits, old_words = flags_to_columns(msg.flags)
                if op is FlagOp.ADD:
                    new_bits, new_words = old_bits | bits, set(old_words.split()) | words
                elif op is FlagOp.REMOVE:
                    new_bits, new_words = old_bits & ~bits, set(old_words.split()) - words
                else:
                    new_bits, new_words = bits, words
                text = " ".join(sorted(new_words))
                if (new_bits, text) != (old_bits, old_words):
                    changed.append((new_bits, text, uid))
            if changed:
                modseq = self._bump(conn, folder_id)
                conn.executemany(
                    "UPDATE mailbox_messages SET sysflags = ?, keywords = ?, modseq = ? "
                    "WHERE folder_id = ? AND uid = ?",
                    [(b, k, modseq, folder_id, uid) for b, k, uid in changed],
                )
                self._changed(folder.user, folder.name)
            return list(self.messages_by_uid(folder_id, uids).values())

    def claim_recent(self, folder_id: int) -> list[int]:
        """The UIDs that are \\Recent for the first session to look, and no one else."""
        with self._write() as conn:
            rows = conn.execute(
                "UPDATE mailbox_messages SET recent = 0 WHERE folder_id = ? AND recent = 1 "
                "RETURNING uid",
                (folder_id,),
            ).fetchall()
        return sorted(r[0] for r in rows)

    def expunge(self, folder_id: int, uids: Sequence[int]) -> list[int]:
        """Remove messages for good; return the UIDs that were there."""
        folder = self._existing(folder_id)
        with self._write() as conn:
            gone = self._remove(conn, folder, uids)
            if gone:
                self._collect_bodies(conn, [body for _, body in gone])
                self._changed(folder.user, folder.name)
        return [uid for uid, _ in gone]

    def copy(
        self, source_id: int, uids: Sequence[int], target_id: int, *, recent: bool = True
    ) -> list[tuple[int, int]]:
        """Copy messages (sharing their bytes); return (source UID, new UID) pairs."""
        target = self._existing(target_id)
        with self._write() as conn:
            rows = self._rows(conn, source_id, uids)
            pairs = self._insert_copies(conn, target, rows, recent)
            if pairs:
                self._changed(target.user, target.name)
        return pairs

    def move(
        self, source_id: int, uids: Sequence[int], target_id: int, *, recent: bool = True
    ) -> list[tuple[int, int]]:
        """Move messages in one transaction; return (old UID, new UID) pairs."""
        source, target = self._existing(source_id), self._existing(target_id)
        if source.id == target.id:
            return []
        with self._write() as conn:
            rows = self._rows(conn, source_id, uids)
            pairs = self._insert_copies(conn, target, rows, recent)
            self._remove(conn, source, [uid for uid, _ in pairs])
            if pairs:
                self._changed(source.user, source.name)
                self._changed(target.user, target.name)
        return pairs

    # -- internals -----------------------------------------------------------------------

    def _existing(self, folder_id: int) -> Folder:
        folder = self.folder_by_id(folder_id)
        if folder is None:
            raise FolderNotFound()
        return folder

    def _bump(self, conn: sqlite3.Connection, folder_id: int) -> int:
        row = conn.execute(
            "UPDATE mailbox_folders SET modseq = modseq + 1 WHERE id = ? RETURNING modseq",
            (folder_id,),
        ).fetchone()
        if row is None:
            raise FolderNotFound()
        return int(row[0])

    def _next_uids(self, conn: sqlite3.Connection, folder_id: int, count: int) -> int:
        """Reserve ``count`` UIDs; return the first."""
        row = conn.execute(
            "UPDATE mailbox_folders SET uidnext = uidnext + ? WHERE id = ? RETURNING uidnext",
            (count, folder_id),
        ).fetchone()
        return int(row[0]) - count

    def _rows(
        self, conn: sqlite3.Connection, folder_id: int, uids: Sequence[int]
    ) -> list[sqlite3.Row]:
        return conn.execute(
            "SELECT * FROM mailbox_messages WHERE folder_id = ? "
            "AND uid IN (SELECT value FROM json_each(?)) "
            "ORDER BY uid",
            (folder_id, _ids(uids)),
        ).fetchall()

    def _insert_copies(
        self, conn: sqlite3.Connection, target: Folder, rows: list[sqlite3.Row], recent: bool
    ) -> list[tuple[int, int]]:
        if not rows:
            return []
        modseq = self._bump(conn, target.id)
        first = self._next_uids(conn, target.id, len(rows))
        pairs = [(row["uid"], first + i) for i, row in enumerate(rows)]
        conn.executemany(
            "INSERT INTO mailbox_messages (folder_id, uid, body_id, internal_date, sysflags, "
            "keywords, recent, modseq, message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (target.id, new, row["body_id"], row["internal_date"], row["sysflags"],
                 row["keywords"], recent, modseq, row["message_id"])
                for (_, new), row in zip(pairs, rows, strict=True)
            ],
        )  # fmt: skip
        return pairs

    def _remove(
        self, conn: sqlite3.Connection, folder: Folder, uids: Sequence[int]
    ) -> list[tuple[int, int]]:
        """Delete message rows and leave tombstones; return (uid, body id) of those removed."""
        gone = [
            (r[0], r[1])
            for r in conn.execute(
                "DELETE FROM mailbox_messages WHERE folder_id = ? "
                "AND uid IN (SELECT value FROM json_each(?)) "
                "RETURNING uid, body_id",
                (folder.id, _ids(uids)),
            )
        ]
        if not gone:
            return gone
        modseq = self._bump(conn, folder.id)
        conn.executemany(
            "INSERT OR REPLACE INTO mailbox_expunged (folder_id, uid, modseq) VALUES (?, ?, ?)",
            [(folder.id, uid, modseq) for uid, _ in gone],
        )
        self._prune_tombstones(conn, folder.id)
        return gone

    def _prune_tombstones(self, conn: sqlite3.Connection, folder_id: int) -> None:
        count = conn.execute(
            "SELECT COUNT(*) FROM mailbox_expunged WHERE folder_id = ?", (folder_id,)
        ).fetchone()[0]
        if count <= _MAX_TOMBSTONES:
            return
        floor = conn.execute(
            "SELECT modseq FROM mailbox_expunged WHERE folder_id = ? "
            "ORDER BY modseq DESC LIMIT 1 OFFSET ?",
            (folder_id, _MAX_TOMBSTONES // 2),
        ).fetchone()[0]
        conn.execute(
            "DELETE FROM mailbox_expunged WHERE folder_id = ? AND modseq <= ?", (folder_id, floor)
        )
        conn.execute(
            "UPDATE mailbox_folders SET expunge_floor = ? WHERE id = ?", (floor, folder_id)
        )

    def _collect_bodies(self, conn: sqlite3.Connection, body_ids: Sequence[int]) -> None:
        """Delete bodies that no message refers to any more."""
        conn.execute(
            "DELETE FROM mailbox_bodies WHERE id IN (SELECT value FROM json_each(?)) "
            "AND NOT EXISTS (SELECT 1 FROM mailbox_messages WHERE body_id = mailbox_bodies.id)",
            (_ids(body_ids),),
        )
