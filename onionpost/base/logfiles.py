"""The log files of the programs the node runs (tor, Dovecot), kept from filling the disk.

A node on a Pi runs for months without a restart.  Dovecot writes a line or two for each
delivery and each mail-client login, tor a line for each network hiccup, and neither rotates
its own file; no logrotate entry knows of them either, since the node writes their
configuration into its data directory.  So the node does what logrotate would: a file past
:data:`LOG_ROTATE_BYTES` is renamed to ``NAME.1`` (the previous ``.1`` goes) and its writer
is told to reopen it.  Each log then takes at most about twice the limit on disk.
"""

from __future__ import annotations

from pathlib import Path

#: A log file is set aside once it is larger than this.
LOG_ROTATE_BYTES = 10 * 1024 * 1024


def set_aside_if_large(path: Path, limit: int = LOG_ROTATE_BYTES) -> bool:
    """Rename ``path`` to ``path.1`` if it is larger than ``limit``; whether it did.

    The writer keeps writing into the renamed file (``.1``) until it reopens ``path``, so
    nothing it writes meanwhile is lost.  OSError (other than a missing file) is left to the
    caller, which knows whose log it is."""
    try:
        if path.stat().st_size <= limit:
            return False
    except FileNotFoundError:
        return False
    path.replace(path.with_name(path.name + ".1"))
    return True
