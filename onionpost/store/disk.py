"""The room left on the data directory's disk, asked before new mail is stored.

A node that lets its disk fill up fails in the middle of a commit, in whichever database
happens to write next.  Refusing new mail while less than ``Config.min_free_mib`` is free
keeps that from happening: the sender (a mail client, another inbox) keeps the message and
tries again, as it does for any temporary refusal.  The decision is
:func:`onionpost.core.quota.short_of_disk`'s; this module only asks the operating system.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from onionpost.core.quota import short_of_disk

MiB = 1 << 20

log = logging.getLogger(__name__)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (one statvfs: microseconds)."""
    return shutil.disk_usage(path).free


class DiskRoom:
    """Whether new mail still fits beside the reserve on ``path``'s disk."""

    def __init__(
        self, path: Path, *, reserve_mib: int, free: Callable[[Path], int] = free_bytes
    ) -> None:
        self.path = path
        self.reserve = reserve_mib * MiB
        self._free = free

    def short_by(self, incoming: int, *, refusing: str) -> int | None:
        """None if ``incoming`` bytes fit; else the bytes free now (for the refusal's words),
        and the log says that ``refusing`` (what the caller refuses) waits for room.

        A disk that cannot be asked counts as roomy: the store's own errors still stop a
        write that truly does not fit."""
        if self.reserve <= 0:
            return None
        try:
            free = self._free(self.path)
        except OSError:
            return None
        if not short_of_disk(free=free, incoming=incoming, reserve=self.reserve):
            return None
        log.warning(
            "%s refused for now: %d MiB free on the disk, %d MiB are kept free "
            "(min_free_mib); free disk space",
            refusing,
            free >> 20,
            self.reserve >> 20,
        )
        return free
