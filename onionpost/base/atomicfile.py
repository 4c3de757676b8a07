"""Replacing a file so that a crash leaves the old one or the new one, never a torn one.

Key files, the configuration, spooled mail, Dovecot's files and the TLS certificates are all
written this way; one function does it, so the order that makes it safe (a temporary file
beside the target, created with its final mode, fsynced, renamed over the target, then the
directory fsynced so the rename itself survives a power cut) is written once.  OSError is
left to the caller, which knows what the file is and says so in its own error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(
    path: Path,
    data: bytes | Callable[[int], None],
    *,
    mode: int = 0o600,
    durable: bool = True,
    prepare: Callable[[int], None] | None = None,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or a function that writes to the open file
    descriptor: a large message is streamed, not held in memory).

    The temporary file is created exclusively (no symlink followed) with ``mode`` from the
    start, so it is never briefly readable by others; ``prepare`` runs on its descriptor
    first (to give it to another account).  ``durable=False`` skips both fsyncs, for scratch
    copies a crash may tear because they are written again from a durable one.  The
    temporary file ends in ``.tmp`` (backups skip such files) and is removed if anything
    fails.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            if prepare is not None:
                prepare(fd)
            if isinstance(data, bytes):
                write_all(fd, data)
            else:
                data(fd)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until all of ``data`` is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
