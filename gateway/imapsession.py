"""Kept-open IMAP sessions to the node's private Dovecot, one per user, for the filer.

Why: Dovecot's LMTP reads a Maildir INBOX's whole ``dovecot-uidlist`` on every delivery
(its duplicate-GUID check, ``mail_deliver_deduplicate_guid_if_needed``: ~0.35 s at 100,000
messages), and every ``doveadm`` call is a new process that opens the folder afresh (seconds
at 100,000).  An IMAP ``APPEND`` saves through Dovecot's ordinary save path, which reads no
uidlist, and a session kept open keeps the folder's index in memory between looks (see
docs/performance.md, "Filing through a kept IMAP session").

How: ``doveadm exec imap -u USER`` starts Dovecot's ``imap`` for the user, pre-authenticated
(``* PREAUTH``), talking IMAP over its standard input and output: no login, no password, no
socket; it runs as the mail user exactly as ``doveadm`` does.  Only IMAP4rev1 with LITERAL+
(without it, the synchronizing literal is used) and UIDPLUS-free answers are relied on:
Dovecot 2.3 and 2.4 both have them.

Guarantees kept:

* an ``APPEND``'s tagged ``OK`` comes after Dovecot committed the message (the same save and
  fsync as LMTP's ``250``); a session that breaks or times out before it is
  :class:`FilingDeferred` (outcome unknown: the filer looks the row up by its header before
  filing it again);
* everything read is bounded: a line (:data:`MAX_LINE`), a literal in a response we do not
  ask for (skipped, :data:`MAX_LITERAL`), what is kept of untagged answers
  (:data:`MAX_KEPT`); each command has a deadline; whatever goes wrong ends the process and
  the next command starts a new one;
* a session unused for :data:`IDLE_CLOSE` seconds is logged out (Dovecot drops idle clients
  after 30 minutes); :meth:`ImapSessions.close` logs every session out and kills what does
  not exit within a second, so the node stops within seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from onionpost.core.errors import FilingDeferred, FilingRefused

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The longest response line read (Dovecot's lines to us are short: a SEARCH of one match).
MAX_LINE = 64 * 1024
#: The largest literal skipped inside an untagged response we did not ask about.
MAX_LITERAL = 1 << 20
#: Bytes of untagged answers kept per command (SEARCH, STATUS); the rest are read and dropped.
MAX_KEPT = 256 * 1024
#: Seconds a session may sit unused before it is logged out (Dovecot's own limit is 30 min).
IDLE_CLOSE = 600.0
#: Seconds a command may take (an APPEND of a 50 MiB message included).
TIMEOUT = 120.0
_CHUNK = 256 * 1024
_LITERAL_AT_END = re.compile(rb"\{(\d{1,10})\+?\}$")
_QUOTABLE = re.compile(rb"^[\x20-\x7e]*$")
_STDERR_KEPT = 5
_ENV_PATH = "/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


class _Literal:
    """A literal's bytes, streamed in chunks; ``size`` known before the first is sent."""

    def __init__(self, size: int, chunks: Callable[[], Iterable[bytes]]) -> None:
        self.size = size
        self.chunks = chunks

    @classmethod
    def of(cls, data: bytes) -> _Literal:
        return cls(len(data), lambda: (data,))


def _crlf_lines(message: bytes | Path) -> Iterator[bytes]:
    """The message's lines with CRLF ends, as LMTP stores them (a lone CR or LF is a line end,
    one is added at the end if missing), batched into chunks of ~256 KiB."""
    from gateway.dovecot import _message_lines

    batch: list[bytes] = []
    size = 0
    for line in _message_lines(message):
        batch.append(line + b"\r\n")
        size += len(line) + 2
        if size >= _CHUNK:
            yield b"".join(batch)
            batch, size = [], 0
    if batch:
        yield b"".join(batch)


def message_literal(message: bytes | Path, prefix: bytes) -> _Literal:
    """``prefix`` (complete CRLF lines) + the message with CRLF line ends: a file is read twice
    (its size first, then its chunks as they are sent), never whole."""
    size = len(prefix) + sum(len(c) for c in _crlf_lines(message))

    def chunks() -> Iterator[bytes]:
        yield prefix
        yield from _crlf_lines(message)

    return _Literal(size, chunks)


def astring(value: str) -> bytes | _Literal:
    """``value`` as an IMAP quoted string, or a literal if it cannot be quoted."""
    raw = value.encode()
    if _QUOTABLE.match(raw):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return _Literal.of(raw)


def mailbox_name(folder: str) -> bytes:
    from gateway.dovecot import _FOLDER

    if folder != "INBOX" and not _FOLDER.match(folder):
        raise FilingRefused(f"{folder!r} is not a folder the node files into.")
    return b'"' + folder.encode() + b'"'


class ImapSession:
    """One user's pre-authenticated IMAP session (a Dovecot ``imap`` process on pipes)."""

    def __init__(self, argv: list[str], user: str, *, timeout: float = TIMEOUT) -> None:
        self.argv = argv
        self.user = user
        self.timeout = timeout
        self.literal_plus = False
        self.used_at = time.monotonic()
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._last_err: collections.deque[str] = collections.deque(maxlen=_STDERR_KEPT)
        self._tag = 0
        #: The folder selected, and whether read-write (SELECT) rather than EXAMINEd.
        self.selected: str | None = None
        self.writable = False

    @property
    def alive(self) -> bool:
        p = self._proc
        return p is not None and p.returncode is None and not p.stdout.at_eof()  # type: ignore[union-attr]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                self._proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    limit=MAX_LINE,
                    start_new_session=True,
                    env={"PATH": _ENV_PATH, "LANG": "C.UTF-8"},
                )
                self._stderr = asyncio.create_task(self._drain_stderr(), name="imap-stderr")
                greeting = await self._line()
        except TimeoutError as exc:
            await self.kill()
            raise FilingDeferred(f"Dovecot's imap for {self.user} did not start.") from exc
        except (OSError, FilingDeferred) as exc:
            await self.kill()
            raise FilingDeferred(f"Cannot start Dovecot's imap for {self.user}: {exc}") from exc
        if not greeting.startswith(b"* PREAUTH"):
            await self.kill()
            raise FilingDeferred(f"Dovecot's imap for {self.user} greeted with {greeting[:80]!r}")
        self.literal_plus = b"LITERAL+" in greeting.split(b"]", 1)[0]

    async def _drain_stderr(self) -> None:
        """Dovecot's log lines for this process (no secrets: no login happens); kept for an
        error message, and read on so the process never blocks on a full pipe."""
        assert self._proc is not None and self._proc.stderr is not None
        with contextlib.suppress(Exception):
            while line := await self._proc.stderr.readline():
                self._last_err.append(line[:300].decode("utf-8", "replace").rstrip())

    def _why(self) -> str:
        return f" ({self._last_err[-1]})" if self._last_err else ""

    async def _line(self) -> bytes:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            line = await self._proc.stdout.readuntil(b"\r\n")
        except asyncio.IncompleteReadError as exc:
            raise FilingDeferred(f"Dovecot's imap for {self.user} ended{self._why()}.") from exc
        except asyncio.LimitOverrunError as exc:
            raise FilingDeferred(f"Dovecot's imap for {self.user}: a line too long.") from exc
        return line[:-2]

    async def command(self, *parts: bytes | _Literal) -> tuple[list[bytes], bytes]:
        """Send one command; its untagged answers of interest and its tagged ``OK`` text.
        ``NO``/``BAD`` raise :class:`FilingDeferred`/:class:`FilingRefused`; anything
        broken, late or oversized ends the process and raises :class:`FilingDeferred`."""
        if not self.alive:
            raise FilingDeferred(f"Dovecot's imap for {self.user} is not running.")
        self.used_at = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout):
                untagged, status, text = await self._command(parts)
        except TimeoutError as exc:
            await self.kill()
            raise FilingDeferred(
                f"Dovecot's imap for {self.user} did not answer within {self.timeout:.0f} s."
            ) from exc
        except OSError as exc:  # the pipe broke: the process ended
            await self.kill()
            raise FilingDeferred(f"Dovecot's imap for {self.user} ended{self._why()}.") from exc
        except (FilingDeferred, asyncio.CancelledError):
            await self.kill()  # its state is unknown: the next command starts afresh
            raise
        finally:
            self.used_at = time.monotonic()
        self._check(status, text)  # a NO or BAD leaves the session as it was
        return untagged, text

    async def _command(
        self, parts: tuple[bytes | _Literal, ...]
    ) -> tuple[list[bytes], bytes, bytes]:
        assert self._proc is not None and self._proc.stdin is not None
        writer = self._proc.stdin
        self._tag += 1
        tag = b"f%d" % self._tag
        line = tag
        for part in parts:
            if isinstance(part, bytes):
                line += b" " + part
                continue
            plus = b"+" if self.literal_plus else b""
            writer.write(line + b" {%d%s}\r\n" % (part.size, plus))
            if not self.literal_plus:
                await writer.drain()
                _, status, text = await self._response(tag, continuation=True)
                if status != b"+":
                    self._check(status, text)
                    raise FilingDeferred("Dovecot's imap did not take the literal.")
            sent = 0
            for chunk in part.chunks():
                sent += len(chunk)
                if sent > part.size:
                    raise FilingDeferred("The message changed while it was being filed.")
                writer.write(chunk)
                await writer.drain()
            if sent != part.size:
                raise FilingDeferred("The message changed while it was being filed.")
            line = b""
        writer.write(line + b"\r\n")
        await writer.drain()
        return await self._response(tag)

    def _check(self, status: bytes, text: bytes) -> None:
        if status == b"OK":
            return
        why = text[:200].decode("utf-8", "replace")
        if status == b"BAD":
            raise FilingRefused(f"Dovecot's imap refused a command: {why}")
        raise FilingDeferred(f"Dovecot's imap answered NO: {why}")

    async def _response(
        self, tag: bytes, *, continuation: bool = False
    ) -> tuple[list[bytes], bytes, bytes]:
        """Read up to ``tag``'s tagged answer (or, with ``continuation``, a ``+``)."""
        kept: list[bytes] = []
        size = 0
        while True:
            line = await self._line()
            if line.startswith(tag + b" "):
                status, _, text = line[len(tag) + 1 :].partition(b" ")
                return kept, status.upper(), text
            if continuation and line.startswith(b"+"):
                return kept, b"+", line[1:]
            if not line.startswith(b"* "):
                raise FilingDeferred(f"Dovecot's imap sent {line[:80]!r}.")
            while m := _LITERAL_AT_END.search(line):  # an answer we did not ask for: skip it
                n = int(m.group(1))
                if n > MAX_LITERAL:
                    raise FilingDeferred("Dovecot's imap sent an oversized literal.")
                assert self._proc is not None and self._proc.stdout is not None
                try:
                    await self._proc.stdout.readexactly(n)
                except asyncio.IncompleteReadError as exc:
                    raise FilingDeferred(f"Dovecot's imap for {self.user} ended.") from exc
                line = line[: m.start()] + b'""' + await self._line()
            word = line[2:].split(b" ", 1)[0].upper()
            if word in (b"SEARCH", b"STATUS", b"BYE"):
                size += len(line)
                if size > MAX_KEPT:
                    raise FilingDeferred("Dovecot's imap answered more than expected.")
                kept.append(line)

    async def logout(self, wait: float = 1.0) -> None:
        """Say LOGOUT, give the process ``wait`` seconds to exit, then kill it."""
        proc = self._proc
        if proc is not None and proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"z LOGOUT\r\n")
                proc.stdin.close()
                async with asyncio.timeout(wait):
                    await proc.wait()
        await self.kill()

    async def kill(self) -> None:
        proc, self._proc = self._proc, None
        self.selected = None
        if proc is not None:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if proc.stdin is not None:
                proc.stdin.close()
            await proc.wait()
        if self._stderr is not None:
            # The process is gone: its stderr pipe ends, and with it the drain.
            with contextlib.suppress(asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    await self._stderr
            if not self._stderr.done():
                self._stderr.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._stderr
            self._stderr = None


class ImapSessions:
    """A session per user, started on first use and again after it ended (see module doc).

    ``argv(user)`` is the command that starts a user's pre-authenticated ``imap``.
    """

    def __init__(self, argv: Callable[[str], list[str]], *, timeout: float = TIMEOUT) -> None:
        self._argv = argv
        self.timeout = timeout
        self._sessions: dict[str, ImapSession] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    def reopen(self) -> None:
        self._closed = False

    def closed(self) -> bool:
        return self._closed

    async def _session(self, user: str) -> tuple[ImapSession, bool]:
        """The user's running session and whether it was started just now."""
        if self._closed:
            raise FilingDeferred("The mail server is stopping.")
        s = self._sessions.get(user)
        if s is not None and (not s.alive or time.monotonic() - s.used_at > IDLE_CLOSE):
            await s.logout()
            s = None
        if s is None:
            s = ImapSession(self._argv(user), user, timeout=self.timeout)
            await s.start()
            if self.closed():  # closed while it started
                await s.logout()
                raise FilingDeferred("The mail server is stopping.")
            self._sessions[user] = s
            log.debug("imap session for %s started (pid %s)", user, s.pid)
            return s, True
        return s, False

    async def run(
        self, user: str, work: Callable[[ImapSession], Awaitable[_T]], *, idempotent: bool
    ) -> _T:
        """``work`` on the user's session, one at a time.  Idempotent work that fails on a
        session reused from before (it may have ended meanwhile) is tried once more on a
        new one.  Other work (an APPEND) is not: a session reused is first checked with a
        NOOP, and an APPEND cut off is :class:`FilingDeferred` (its outcome is unknown; the
        filer looks the row up before filing it again)."""
        lock = self._locks.setdefault(user, asyncio.Lock())
        async with lock:
            session, fresh = await self._session(user)
            if not fresh and not idempotent:
                # A NOOP first: a process that ended since its last use is found out before
                # a byte of the APPEND is sent (then nothing can have been saved).
                with contextlib.suppress(FilingDeferred):
                    await session.command(b"NOOP")
                if not session.alive:
                    session, fresh = await self._session(user)
            try:
                return await work(session)
            except FilingDeferred:
                if fresh or not idempotent or session.alive or self._closed:
                    raise
            session, _ = await self._session(user)
            return await work(session)

    async def close(self) -> None:
        """Log every session out (the node stops, or Dovecot does); a later use starts anew
        only after :meth:`reopen`."""
        self._closed = True
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.logout() for s in sessions), return_exceptions=True)


# --- what the filer asks ----------------------------------------------------------------------


async def _select(session: ImapSession, folder: str, *, write: bool) -> None:
    """Have ``folder`` selected (and synced: what other processes saved since is seen).

    INBOX is only EXAMINEd (read-only) unless flags are to change: a session that SELECTs a
    folder takes the \\Recent flag of every message that arrives while it is selected, which
    mail clients then would not see.  A folder stays selected until another is needed."""
    writable = write or folder != "INBOX"
    if session.selected == folder and (session.writable or not writable):
        await session.command(b"NOOP")
        return
    session.selected = None
    await session.command(b"SELECT" if writable else b"EXAMINE", mailbox_name(folder))
    session.selected, session.writable = folder, writable


def _search_keys(header: str, value: str, from_uid: int) -> list[bytes | _Literal]:
    keys: list[bytes | _Literal] = [b"UID", b"%d:*" % from_uid] if from_uid > 1 else []
    return [*keys, b"HEADER", astring(header), astring(value)]


def _uids(untagged: list[bytes]) -> list[int]:
    uids: list[int] = []
    for line in untagged:
        words = line.split()
        if len(words) >= 2 and words[1].upper() == b"SEARCH":
            uids.extend(int(w) for w in words[2:] if w.isdigit())
    return uids


async def append(
    session: ImapSession,
    folder: str,
    message: bytes | Path,
    prefix: bytes,
    *,
    seen: bool = False,
) -> None:
    """Save ``prefix`` + ``message`` into ``folder`` (with ``\\Seen`` already set if
    ``seen``: no flag change, hence no rename in ``cur/``, afterwards); returns after
    Dovecot's commit."""
    literal = await asyncio.to_thread(message_literal, message, prefix)
    flags = (b"(\\Seen)",) if seen else ()
    await session.command(b"APPEND", mailbox_name(folder), *flags, literal)


async def search(
    session: ImapSession,
    folder: str,
    header: str,
    value: str,
    from_uid: int,
    *,
    write: bool = False,
) -> list[int]:
    await _select(session, folder, write=write)
    untagged, _ = await session.command(b"UID SEARCH", *_search_keys(header, value, from_uid))
    return _uids(untagged)


async def add_seen(
    session: ImapSession, folder: str, header: str, value: str, from_uid: int
) -> None:
    uids = await search(session, folder, header, value, from_uid, write=True)
    if uids:
        await session.command(
            b"UID STORE", b",".join(b"%d" % u for u in uids), b"+FLAGS.SILENT (\\Seen)"
        )


async def uidnext(session: ImapSession, folder: str) -> int:
    untagged, _ = await session.command(b"STATUS", mailbox_name(folder), b"(UIDNEXT)")
    for line in untagged:
        if m := re.search(rb"\(.*UIDNEXT (\d+)", line):
            return int(m.group(1))
    raise FilingDeferred(f"Dovecot's imap gave no UIDNEXT for {folder}.")
