"""``onionpost backup`` and ``onionpost restore``: one encrypted file that brings a node back.

An SD card dies without warning; the onion key in ``inbox/server.key`` *is* the address.  A
backup is the data directory (keys, configuration, mail, queues) as one tar archive, encrypted
with a passphrase (``crypto.backup``).  Databases are copied with SQLite's online backup, so a
backup taken while the node runs is consistent.  What is left out can be rebuilt: tor's state
(``tor/``: onionpost gives tor the onion key itself at every start) and the run state.

Restore writes only into a data directory that holds no identity yet, checks every archive
member (no absolute paths, no ``..``, only files and directories), and sets the usual modes.
The Maildirs were copied file by file while Dovecot ran, its index beside them: restore leaves
``gateway.dovecot.request_resync``'s marker, and the node's first start has Dovecot reread every
folder from disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gateway.dovecot import Layout, request_resync
from onionpost.base.config import CONFIG_FILE, Config
from onionpost.core.address import Address
from onionpost.core.crypto import backup as sealed
from onionpost.core.errors import AlreadyInitialized, DataDirError, MalformedData, NotInitialized
from onionpost.store.db import snapshot
from onionpost.store.keystore import AccountFiles, KeyStore, ensure_private_dir

SKIP_DIRS = {"run", "tor"}
#: Dovecot's sockets and pid file: recreated on start.
SKIP_PATHS = {"dovecot/run"}
SKIP_SUFFIXES = ("-wal", "-shm", "-journal", ".tmp", ".lock")
PUBLIC = {"tls/ca.pem", "tls/cert.pem"}


@dataclass(frozen=True)
class BackupReport:
    files: int
    plaintext_bytes: int
    written_bytes: int


@contextlib.contextmanager
def _scratch(config: Config) -> Iterator[Path]:
    base = ensure_private_dir(config.data_dir / "run")
    path = Path(tempfile.mkdtemp(prefix="backup-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _members(data_dir: Path) -> Iterator[tuple[Path, str]]:
    for path in sorted(data_dir.rglob("*")):
        rel = path.relative_to(data_dir)
        if rel.parts[0] in SKIP_DIRS or path.name.endswith(SKIP_SUFFIXES):
            continue
        if any(rel.as_posix().startswith(f"{p}/") for p in SKIP_PATHS):
            continue
        if path.is_file() and not path.is_symlink():
            yield path, rel.as_posix()


def _current(path: Path) -> Path | None:
    """Where a file listed a moment ago is now.  Dovecot renames Maildir files while it runs
    (new/ to cur/ when a client first sees a message, and ``:2,<flags>`` on every flag
    change), so a message listed under one name may be found under another."""
    if path.exists():
        return path
    box = path.parent.parent
    if path.parent.name not in ("new", "cur"):
        return None
    base = path.name.split(":", 1)[0]
    for sub in ("cur", "new"):
        for candidate in sorted((box / sub).glob(f"{base}*")):
            if candidate.name.split(":", 1)[0] == base:
                return candidate
    return None


def make_backup(config: Config, target: Path, passphrase: str) -> BackupReport:
    data_dir = config.data_dir
    keys = KeyStore(data_dir)
    if not keys.has_server() and not AccountFiles(keys).users():
        raise NotInitialized()
    if target.resolve().is_relative_to(data_dir.resolve()):
        raise DataDirError("Write the backup outside the data directory it backs up.")
    with _scratch(config) as tmp:
        archive = tmp / "archive.tar"
        files = 0
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as tar:
            for path, name in _members(data_dir):
                if path.suffix == ".db":
                    copy = tmp / f"{files}.db"
                    snapshot(path, copy)
                    tar.add(copy, arcname=name, recursive=False)
                else:
                    moved = _current(path)
                    if moved is None:
                        continue  # deleted meanwhile (a message expunged while we ran)
                    tar.add(moved, arcname=moved.relative_to(data_dir).as_posix(), recursive=False)
                files += 1
        size = archive.stat().st_size
        partial = target.with_name(f".{target.name}.partial")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out, archive.open("rb") as src:
                written = sealed.seal(src, out, passphrase)
                out.flush()
                os.fsync(out.fileno())
            partial.replace(target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise DataDirError(f"Cannot write the backup {target}: {exc.strerror}.") from exc
    return BackupReport(files, size, written)


def _check_member(m: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(m.name)
    if name.is_absolute() or ".." in name.parts or not (m.isfile() or m.isdir()):
        raise MalformedData(f"The backup contains an unsafe entry ({m.name!r}); not restored.")
    return name


def restore_backup(config: Config, source: Path, passphrase: str) -> list[str]:
    """Restore into an empty data directory; returns the addresses it brings back."""
    data_dir = config.data_dir
    keys = KeyStore(data_dir)
    if keys.has_server() or AccountFiles(keys).users():
        raise AlreadyInitialized(
            f"{data_dir} already holds an onionpost identity; restore into a new data "
            "directory (--data-dir) or move this one away first."
        )
    ensure_private_dir(data_dir)
    try:
        src = source.open("rb")
    except OSError as exc:
        raise DataDirError(f"Cannot read {source}: {exc.strerror}.") from exc
    with src, _scratch(config) as tmp:
        archive = tmp / "archive.tar"
        with archive.open("wb") as out:
            sealed.open_(src, out, passphrase)
        try:
            with tarfile.open(archive, "r") as tar:
                members = tar.getmembers()
                for m in members:
                    _check_member(m)
                for m in members:
                    rel = _check_member(m)
                    dest = data_dir.joinpath(*rel.parts)
                    if m.isdir():
                        ensure_private_dir(dest)
                        continue
                    ensure_private_dir(dest.parent)
                    reader = tar.extractfile(m)
                    if reader is None:
                        continue
                    mode = 0o644 if rel.as_posix() in PUBLIC else 0o600
                    if dest.name == CONFIG_FILE and dest.exists():
                        continue  # a configuration written here first (ports, tor) wins
                    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
                    with reader, os.fdopen(fd, "wb") as out:
                        shutil.copyfileobj(reader, out, 1 << 20)
                        out.flush()
                        os.fsync(out.fileno())
                    dest.chmod(mode)
                    # A Maildir message's modification time is its received date (IMAP's
                    # INTERNALDATE): restored mail keeps the day it came, not the restore's.
                    os.utime(dest, (m.mtime, m.mtime))
        except tarfile.TarError as exc:
            raise MalformedData(f"The backup's archive is damaged: {exc}") from exc
    layout = Layout(data_dir)
    if layout.mail.exists():
        # The Maildirs and Dovecot's index were copied at slightly different moments while
        # Dovecot ran: its first start here rereads every folder rather than trust the index.
        try:
            request_resync(layout)
        except OSError as exc:
            raise DataDirError(
                f"Restored, but cannot write {layout.resync_marker}: {exc.strerror}. Create "
                "that file (empty) before starting onionpost."
            ) from exc
    files = AccountFiles(KeyStore(data_dir))
    found = [str(files.load(u).address) for u in files.users()]
    if keys.has_server():
        onion = Address.for_key("x", keys.load_server().onion_pk).onion
        found.append(f"the inbox {onion}.onion")
    return found
