"""Reading what the node filed, for tests.

:class:`MemorySink` stands in for Dovecot in fast tests that only need to see what the filer
hands over (the filer's own exactly-once logic runs unchanged); the tests of the real path
(tests/integration/test_dovecot*.py, test_crash_safety.py, the client tests) use Dovecot.
:func:`maildir_messages` reads a real node's Maildir directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from onionpost.device.filing import FILING_HEADER


def _strip_filing_header(data: bytes) -> bytes:
    prefix = FILING_HEADER.encode() + b":"
    if data.startswith(prefix):
        return data[data.index(b"\n") + 1 :]
    return data


class MemorySink:
    """The filer's mailbox in memory: (user, folder) -> messages, with their flags."""

    def __init__(self) -> None:
        self.boxes: dict[tuple[str, str], list[tuple[bytes, set[str]]]] = {}
        self.refuse: Exception | None = None  # raise this from deliver (a broken mailbox)

    async def deliver(
        self,
        user: str,
        folder: str,
        message: Path | bytes,
        *,
        header: bytes,
        seen: bool = False,
    ) -> None:
        if self.refuse is not None:
            raise self.refuse
        data = header + (message if isinstance(message, bytes) else message.read_bytes())
        self.boxes.setdefault((user, folder), []).append((data, {"\\Seen"} if seen else set()))

    async def holds(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> bool:
        return bool(self._matching(user, folder, header, value, from_uid))

    async def mark_seen(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> None:
        for _, flags in self._matching(user, folder, header, value, from_uid):
            flags.add("\\Seen")

    async def next_uid(self, user: str, folder: str) -> int:
        """UIDs here are positions from 1 (nothing is ever expunged)."""
        return len(self.boxes.get((user, folder), [])) + 1

    def _matching(
        self, user: str, folder: str, header: str, value: str, from_uid: int = 1
    ) -> list[tuple[bytes, set[str]]]:
        needle = f"{header}: {value}".lower().encode()
        return [
            (d, f)
            for d, f in self.boxes.get((user, folder), [])[from_uid - 1 :]
            if needle in d.split(b"\r\n\r\n", 1)[0].lower()
        ]

    def messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        return [_strip_filing_header(d) for d, _ in self.boxes.get((user, folder), [])]

    def flags(self, user: str, folder: str = "INBOX") -> list[set[str]]:
        return [f for _, f in self.boxes.get((user, folder), [])]


def maildir_messages(data_dir: Path, user: str, folder: str = "INBOX") -> list[bytes]:
    """The messages of ``folder`` in a node's Maildir (``<data>/mail/<user>``), oldest first."""
    root = data_dir / "mail" / user
    box = root if folder == "INBOX" else root / f".{folder}"
    # A running node's Dovecot moves files from new/ to cur/ (and renames them when flags
    # change) while they are read here: a file gone between listing and reading means
    # "look again", never "lost".
    for _ in range(100):
        try:
            return _read_maildir(box)
        except FileNotFoundError:
            continue
    return _read_maildir(box)


def _read_maildir(box: Path) -> list[bytes]:
    files: list[tuple[float, str, bytes]] = []
    for sub in ("new", "cur"):
        with contextlib.suppress(FileNotFoundError):
            for p in (box / sub).iterdir():
                if p.is_file():
                    files.append((p.stat().st_mtime, p.name, p.read_bytes()))
    files.sort(key=lambda f: (f[0], f[1]))
    # Dovecot keeps Maildir files with LF line ends; IMAP serves them with CRLF, as here.
    return [_strip_filing_header(_strip_return_path(_crlf(data))) for _, _, data in files]


def _crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _strip_return_path(data: bytes) -> bytes:
    if data.startswith(b"Return-Path:"):
        return data[data.index(b"\n") + 1 :]
    return data


_SINKS: dict[int, MemorySink] = {}


async def memory_mailbox(node: Any) -> Callable[[], Awaitable[None]]:
    """A node extension (``Node(..., extensions=(memory_mailbox,))``): the node files into a
    :class:`MemorySink` instead of Dovecot; :func:`sink_of` finds it."""
    sink = MemorySink()
    _SINKS[id(node)] = sink
    if node.filer is not None:
        node.filer.attach(sink)

    async def stop() -> None:
        if node.filer is not None:
            node.filer.attach(None)

    return stop


def sink_of(node: Any) -> MemorySink:
    return _SINKS[id(node)]


def filed(node: Any, user: str, folder: str = "INBOX") -> list[bytes]:
    """What a :class:`~onionpost.app.node.Node` filed for ``user``: from its memory sink if it
    runs with :func:`memory_mailbox`, else from its Dovecot's Maildir."""
    sink = _SINKS.get(id(node))
    if sink is not None:
        return sink.messages(user, folder)
    return maildir_messages(node.config.data_dir, user, folder)


def subjects(node: Any, user: str, folder: str = "INBOX") -> list[str]:
    out = []
    for m in filed(node, user, folder):
        for line in m.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return out
