"""What every test shares: a leaked SQLite connection fails the test on every Python.

Python 3.13 warns (ResourceWarning) when a sqlite3 connection is garbage-collected without
having been closed, and pyproject's ``filterwarnings`` makes that warning an error.  Python
3.11 and 3.12 stay silent, so a leak would pass here and fail on Debian 13; connections made
on those versions get the same check.  To find where a reported connection was opened, run
the test again with ``PYTHONTRACEMALLOC=20``.
"""

from __future__ import annotations

import gc
import shutil
import sqlite3
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if sys.version_info < (3, 13):

    class _WarnsWhenLeaked(sqlite3.Connection):
        def __del__(self) -> None:
            try:
                self.total_changes  # noqa: B018 - raises once the connection is closed
            except sqlite3.ProgrammingError:
                return
            self.close()
            warnings.warn(f"unclosed database in {self!r}", ResourceWarning, 1, self)

    _connect = sqlite3.connect

    def _connect_warns_when_leaked(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", _WarnsWhenLeaked)
        return _connect(*args, **kwargs)

    sqlite3.connect = _connect_warns_when_leaked


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """Collect what a test left behind while it is still the current test, so that a leak
    (reported from a finalizer) fails the test that leaked, not a later one."""
    yield
    gc.collect()


@pytest.fixture
def mail_tmp() -> Iterator[Path]:
    """A short temporary directory other accounts may pass through: a node run as root
    runs its Dovecot's mail processes as another account, and Dovecot's socket paths must
    stay short (pytest's own tmp_path is 0700 and long)."""
    base = Path(tempfile.mkdtemp(prefix="op-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
