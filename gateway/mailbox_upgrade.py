"""Moving a data directory's SQLite mailbox (the pymap era) into Dovecot's Maildirs, once.

Versions before the private Dovecot kept each user's folders and messages in ``device.db``
(tables ``mailbox_folders``, ``mailbox_messages``, ``mailbox_bodies`` ...).  The node calls
:func:`upgrade_sqlite_mailbox` on start, *before* it starts Dovecot: with Dovecot not running,
writing Maildir files directly in Dovecot's documented Maildir++ format is safe, and Dovecot
picks them up (assigning new UIDs, under a new UIDVALIDITY) the first time a client looks.
Before writing anything it leaves :func:`gateway.dovecot.request_resync`'s marker, so Dovecot
rereads every folder from disk when it starts rather than trusting an index it may already have.

What is carried over, per user, into ``Layout.maildir(user)``:

* **Folders**: INBOX is the Maildir itself, ``A/B`` becomes ``.A.B`` (Maildir++, names in
  modified UTF-7 as Dovecot stores them, a ``maildirfolder`` marker in each).  Dovecot cannot
  store a ``.`` in a folder name here (the Maildir++ hierarchy separator) nor a name that begins
  with ``~``: such characters become ``_``, a clash with an existing name gets ``_2``, ``_3``
  ..., and a name too long for one directory entry (255 bytes) becomes ``Folder <id>``.  Every
  rename is logged and listed in the :class:`UpgradeReport`.
* **Messages**, byte for byte, one file each in ``cur/``: ``<uid>.U<folder id>.onionpost-upgrade
  ,S=<size>,W=<size with CRLF>:2,<flags>``.  The leading number is the old UID, so Dovecot, which
  numbers files it has not seen in that order, keeps the folder's order.
* **Flags**: ``\\Draft \\Flagged \\Answered \\Seen \\Deleted`` as ``D F R S T``; keywords as the
  letters ``a``..``z`` that the folder's ``dovecot-keywords`` file maps to names (26 per folder
  is what Maildir can hold in a file name; the rarest beyond that are reported, not kept).
* **INTERNALDATE** as the file's modification time, which is where Dovecot's Maildir reads it.
* **Subscriptions** into ``subscriptions`` (Dovecot's version 2 format: ``V\\t2``, a blank line,
  one name a line with the hierarchy separator written as a tab).
* Not carried: ``\\Recent``, UIDs and UIDVALIDITY (Dovecot assigns its own, so every mail client
  downloads its cache once more), and the IMAP gateway's caches (envelopes, expunge tombstones).

Atomic and resumable: each message is written to ``tmp/``, its data and date are fsynced, and it
is renamed into ``cur/`` under a name derived only from its old folder id, UID and flags.  A run
that is interrupted (crash, power loss, a full disk) leaves the database untouched, and the next
run skips every message whose file is already in ``cur/``, so nothing is written twice and
nothing is lost.  Only when every user's mail is on disk (and the directories fsynced) are the
old tables dropped, in one transaction that also records the upgrade in ``mailbox_upgrade``; from
then on a start skips the upgrade after one lookup.  ``mailbox_seen_ids`` stays: it is what
makes filing exactly-once (a replayed message id is recognised), and has nothing to do with IMAP.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.dovecot import Identity, Layout, request_resync
from onionpost.base.atomicfile import fsync_dir, write_atomic
from onionpost.core.errors import MailServerError, UnknownLocalUser
from onionpost.store.db import Database

__all__ = ["UpgradeReport", "upgrade_sqlite_mailbox"]

log = logging.getLogger(__name__)

#: The tables of the SQLite mailbox, children before parents (foreign keys are on).
OLD_TABLES = (
    "mailbox_envelopes",
    "mailbox_expunged",
    "mailbox_messages",
    "mailbox_bodies",
    "mailbox_folders",
    "mailbox_counters",
)
_FLAG_LETTERS = ((16, "D"), (4, "F"), (2, "R"), (1, "S"), (8, "T"))  # ASCII order, as Maildir wants
_HOST = "onionpost-upgrade"
_MAX_KEYWORDS = 26
_NAME_MAX = 255
_SUBSCRIPTIONS_HEADER = "V\t2\n\n"


@dataclass(frozen=True)
class UpgradeReport:
    """What :func:`upgrade_sqlite_mailbox` did; ``ran`` is False when there was nothing to do."""

    ran: bool
    users: int = 0
    folders: int = 0
    messages: int = 0  # files in Maildirs for the old messages, in total
    written: int = 0  # of those, written by this run (the rest by an interrupted earlier one)
    bytes: int = 0
    seconds: float = 0.0
    renamed: tuple[tuple[str, str, str], ...] = ()  # (user, old name, new name)
    dropped_keywords: tuple[tuple[str, str, str], ...] = ()  # (user, folder, keyword)


@dataclass
class _Folder:
    id: int
    user: str
    name: str  # the old name, "/"-separated
    new_name: str  # the name Dovecot will show
    subscribed: bool
    path: Path = field(default=Path())
    letters: dict[str, str] = field(default_factory=dict)  # keyword -> a..z


def upgrade_sqlite_mailbox(db: Database, layout: Layout, identity: Identity) -> UpgradeReport:
    """Move the SQLite mailbox in ``db`` (``device.db``) into ``layout``'s Maildirs.

    Call it before Dovecot starts, every start: it returns at once (``ran=False``) when there
    is no SQLite mailbox or it was already moved.  Files and directories are created 0600/0700
    and owned by ``identity``'s mail account.  Raises :class:`MailServerError` when the mail
    cannot be written (a full disk, permissions); running it again continues where it stopped.
    """
    if _table_exists(db, "mailbox_upgrade") or not _table_exists(db, "mailbox_folders"):
        return UpgradeReport(ran=False)
    started = time.monotonic()
    folders = _plan_folders(db, layout)
    users = sorted({f.user for f in folders})
    renamed = tuple((f.user, f.name, f.new_name) for f in folders if f.name != f.new_name)
    for user, old, new in renamed:
        log.warning("upgrade: %s's folder %r is called %r in Dovecot", user, old, new)
    log.info(
        "upgrade: moving the SQLite mailbox of %d user(s), %d folder(s), into Dovecot's Maildirs",
        len(users),
        len(folders),
    )
    dropped: list[tuple[str, str, str]] = []
    total = written = size = 0
    try:
        request_resync(layout)  # first: an interrupted run leaves it too
        _mkdir(layout.mail, identity)
        for user in users:
            _mkdir(layout.maildir(user), identity)
        for folder in folders:
            _create_folder(folder, identity)
            dropped += [
                (folder.user, folder.new_name, k) for k in _map_keywords(db, folder, identity)
            ]
        pending, total = _pending_messages(db, folders)
        _check_space(layout, sum(p[2] for p in pending))
        last_log = time.monotonic()
        for folder, row, _size in pending:
            data = _body(db, int(row["body_id"]))
            _write_message(folder.path, _filename(folder, row, data), data, row, identity)
            written += 1
            size += len(data)
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info("upgrade: %d of %d messages written", written, len(pending))
        for folder in folders:
            fsync_dir(folder.path / "cur")
        for user in users:
            names = [f for f in folders if f.user == user and f.subscribed]
            _write_subscriptions(layout.maildir(user), names, identity)
            fsync_dir(layout.maildir(user))
        fsync_dir(layout.mail)
    except OSError as exc:
        raise MailServerError(
            f"Moving the mailbox into {layout.mail} stopped: {exc}. Nothing is lost; fix the "
            "cause (free disk space, permissions) and start onionpost again to continue."
        ) from exc
    seconds = time.monotonic() - started
    report = UpgradeReport(
        ran=True,
        users=len(users),
        folders=len(folders),
        messages=total,
        written=written,
        bytes=size,
        seconds=seconds,
        renamed=renamed,
        dropped_keywords=tuple(dropped),
    )
    _finish(db, report)
    log.info(
        "upgrade: done: %d messages (%d written now, %.1f MiB) in %.1f s; the old tables are gone",
        total,
        written,
        size / 2**20,
        seconds,
    )
    return report


# --- reading the old mailbox --------------------------------------------------------------


def _table_exists(db: Database, name: str) -> bool:
    return bool(db.scalar("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)))


def _plan_folders(db: Database, layout: Layout) -> list[_Folder]:
    """Every folder with the name it gets in Dovecot (deterministic: the same on every run)."""
    rows = db.all("SELECT id, user, name, subscribed FROM mailbox_folders ORDER BY user, id")
    by_user: dict[str, list[Any]] = {}
    for row in rows:
        by_user.setdefault(row["user"], []).append(row)
    folders: list[_Folder] = []
    for user, user_rows in by_user.items():
        try:
            root = layout.maildir(user)
        except UnknownLocalUser:
            raise MailServerError(
                f"The mailbox of {user!r} cannot be moved into Dovecot: that is not a valid "
                "user name for it. Remove the user with the previous version, then upgrade."
            ) from None
        # Names Dovecot can store keep them; the others are renamed around them.
        taken = {r["name"] for r in user_rows if _storable(r["name"])}
        for row in user_rows:
            name = row["name"]
            new = name if _storable(name) else _rename(name, row["id"], taken)
            taken.add(new)
            folder = _Folder(row["id"], user, name, new, bool(row["subscribed"]))
            folder.path = root if new == "INBOX" else root / _dirname(new)
            folders.append(folder)
    return folders


def _storable(name: str) -> bool:
    return "." not in name and not name.startswith("~") and len(_dirname(name)) <= _NAME_MAX


def _rename(name: str, folder_id: int, taken: set[str]) -> str:
    fixed = "/".join(part.replace(".", "_") for part in name.split("/"))
    if fixed.startswith("~"):
        fixed = "_" + fixed[1:]
    if len(_dirname(fixed)) > _NAME_MAX:
        fixed = f"Folder {folder_id}"
    candidate, n = fixed, 1
    while candidate in taken:
        n += 1
        candidate = f"{fixed}_{n}"
    return candidate


def _dirname(name: str) -> str:
    """The Maildir++ directory of a folder: ``.`` plus its modified UTF-7 parts joined by ``.``."""
    return "." + ".".join(mutf7(part) for part in name.split("/"))


def mutf7(text: str) -> str:
    """IMAP's modified UTF-7 (RFC 3501 5.1.3), which Dovecot uses for Maildir folder names."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode().rstrip("=").replace("/", ",") + "-")
            run.clear()

    for ch in text:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


def _pending_messages(
    db: Database, folders: list[_Folder]
) -> tuple[list[tuple[_Folder, Any, int]], int]:
    """(folder, row, size) of every message whose file is not in ``cur/`` yet; and the total."""
    pending: list[tuple[_Folder, Any, int]] = []
    total = 0
    for folder in folders:
        # A file's name starts with its base (the rest is sizes and flags): the record of an
        # earlier run's progress.
        present = {name.split(",", 1)[0] for name in os.listdir(folder.path / "cur")}
        rows = db.all(
            "SELECT m.uid, m.body_id, m.internal_date, m.sysflags, m.keywords, b.size"
            " FROM mailbox_messages m"
            " JOIN mailbox_bodies b ON b.id = m.body_id WHERE m.folder_id = ? ORDER BY m.uid",
            (folder.id,),
        )
        total += len(rows)
        for row in rows:
            if _base(folder, row) not in present:
                pending.append((folder, row, int(row["size"])))
    return pending, total


def _body(db: Database, body_id: int) -> bytes:
    data = db.scalar("SELECT data FROM mailbox_bodies WHERE id = ?", (body_id,))
    return bytes(data) if data is not None else b""


# --- writing Maildirs ---------------------------------------------------------------------


def _base(folder: _Folder, row: Any) -> str:  # noqa: ANN401
    return f"{row['uid']}.U{folder.id}.{_HOST}"


def _filename(folder: _Folder, row: Any, data: bytes) -> str:  # noqa: ANN401
    virtual = len(data) + data.count(b"\n") - data.count(b"\r\n")  # as served, with CRLF
    flags = "".join(letter for bit, letter in _FLAG_LETTERS if row["sysflags"] & bit)
    letters = sorted(folder.letters[k] for k in row["keywords"].split() if k in folder.letters)
    return f"{_base(folder, row)},S={len(data)},W={virtual}:2,{flags}{''.join(letters)}"


def _write_message(folder: Path, name: str, data: bytes, row: Any, ident: Identity) -> None:  # noqa: ANN401
    """tmp/name (0600, the mail account's), data and date fsynced, renamed into cur/."""
    tmp = folder / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        _chown_fd(fd, ident)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        date = int(row["internal_date"])
        os.utime(fd, (date, date))  # Dovecot's Maildir reads INTERNALDATE from the mtime
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, folder / "cur" / name)


def _create_folder(folder: _Folder, ident: Identity) -> None:
    _mkdir(folder.path, ident)
    for sub in ("cur", "new", "tmp"):
        _mkdir(folder.path / sub, ident)
    if folder.new_name != "INBOX":
        marker = folder.path / "maildirfolder"
        if not marker.exists():
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                _chown_fd(fd, ident)
            finally:
                os.close(fd)
    fsync_dir(folder.path)
    fsync_dir(folder.path.parent)


def _map_keywords(db: Database, folder: _Folder, ident: Identity) -> list[str]:
    """Give the folder's keywords letters in its ``dovecot-keywords``; return those left out.

    Keywords already in the file (an interrupted earlier run, or Dovecot itself) keep their
    index; new ones are added most used first, so at most the rarest are left out.
    """
    counts: Counter[str] = Counter()
    for (text,) in db.all(
        "SELECT keywords FROM mailbox_messages WHERE folder_id = ? AND keywords != ''",
        (folder.id,),
    ):
        counts.update(text.split())
    path = folder.path / "dovecot-keywords"
    existing: dict[int, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            index, _, word = line.partition(" ")
            if index.isdigit() and word:
                existing[int(index)] = word
    known = set(existing.values())
    new = sorted((k for k in counts if k not in known), key=lambda k: (-counts[k], k))
    free = (i for i in range(_MAX_KEYWORDS) if i not in existing)
    added = dict(zip(free, new, strict=False))
    if added:
        existing.update(added)
        text = "".join(f"{i} {w}\n" for i, w in sorted(existing.items()))
        _atomic_write(path, text.encode(), ident)
    folder.letters = {w: chr(ord("a") + i) for i, w in existing.items() if i < _MAX_KEYWORDS}
    return sorted(k for k in counts if k not in folder.letters)


def _write_subscriptions(maildir: Path, folders: list[_Folder], ident: Identity) -> None:
    """Add the subscribed folders to Dovecot's ``subscriptions`` (version 2 format)."""
    path = maildir / "subscriptions"
    lines: list[str] = []
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(encoding="utf-8")
        if text.startswith(_SUBSCRIPTIONS_HEADER):
            lines = [line for line in text[len(_SUBSCRIPTIONS_HEADER) :].split("\n") if line]
    for folder in folders:
        entry = "\t".join(mutf7(part) for part in folder.new_name.split("/"))
        if entry not in lines:
            lines.append(entry)
    if lines:
        data = _SUBSCRIPTIONS_HEADER + "".join(f"{line}\n" for line in lines)
        _atomic_write(path, data.encode(), ident)


def _mkdir(path: Path, ident: Identity) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    if os.geteuid() == 0:
        os.chown(path, ident.mail_uid, ident.mail_gid)


def _chown_fd(fd: int, ident: Identity) -> None:
    if os.geteuid() == 0:
        os.fchown(fd, ident.mail_uid, ident.mail_gid)


def _atomic_write(path: Path, data: bytes, ident: Identity) -> None:
    """``path`` replaced atomically by a file of the mail account's."""
    write_atomic(path, data, prepare=lambda fd: _chown_fd(fd, ident))


def _check_space(layout: Layout, needed: int) -> None:
    free = shutil.disk_usage(layout.mail).free
    if needed and free < needed + needed // 10 + 64 * 2**20:
        raise MailServerError(
            f"Moving the mailbox into Dovecot needs about {needed / 2**20:.0f} MiB in "
            f"{layout.mail}, but only {free / 2**20:.0f} MiB are free. Free some space and start "
            "onionpost again (the old mailbox stays as it is until the move is complete)."
        )


# --- the end ------------------------------------------------------------------------------


def _finish(db: Database, report: UpgradeReport) -> None:
    """Drop the old tables and record the upgrade, in one transaction; then reclaim the space."""
    details = {
        "renamed": report.renamed,
        "dropped_keywords": report.dropped_keywords,
    }
    with db.transaction():
        for table in OLD_TABLES:
            db.execute(f"DROP TABLE IF EXISTS {table}")
        db.execute(
            "DELETE FROM schema_migrations WHERE component = 'mailbox'"
        )  # the seen ids live on in the 'seen' component
        db.execute(
            "CREATE TABLE mailbox_upgrade (id INTEGER PRIMARY KEY CHECK (id = 1),"
            " finished_at INTEGER NOT NULL, users INTEGER NOT NULL, folders INTEGER NOT NULL,"
            " messages INTEGER NOT NULL, details TEXT NOT NULL)"
        )
        db.execute(
            "INSERT INTO mailbox_upgrade VALUES (1, ?, ?, ?, ?, ?)",
            (int(time.time()), report.users, report.folders, report.messages, json.dumps(details)),
        )
    db.execute("VACUUM")  # the bodies' pages back to the file system
