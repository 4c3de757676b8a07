"""Reading a node's mail without a mail client: thin wrappers around ``doveadm``.

``onionpost read`` and ``onionpost search`` (so the owner of a Pi can read mail over SSH) go
through this module.  It runs ``doveadm -c <data>/dovecot/dovecot.conf`` on the Maildirs of
the private Dovecot (gateway/dovecot.py); Dovecot itself need not be running.  doveadm is
run without ``-u``: that would look the user up through the running Dovecot's auth socket.
Instead it gets the user's name and home (``USER``, ``HOME`` and ``-o mail_home``, which is
what the generated ``userdb`` would answer; Dovecot 2.4 also wants ``--no-userdb-lookup``)
and the mail account's uid and gid (``-o mail_uid``, ``-o mail_gid``): the owner of
``<data>/mail``, which is the node's user for an unprivileged node and the mail account
:func:`gateway.dovecot.choose_identity` chose for a root node.  As root, doveadm reads the
configuration and then changes to that account before it opens any mail; as another user it
must be that account (anyone else cannot read the data directory anyway).

Everything is passed as argv, never through a shell, with ``--`` before the arguments so that
a search word beginning with ``-`` stays a word; no secret is on any command line.  Answers
are read as doveadm's JSON (``-f json``), except a whole message, which is read byte for byte
(``-f pager`` with the single field ``text``: a ``text:`` line, then the message as stored,
with LF line ends).  Header values are unfolded and their RFC 2047 encoded words decoded
here; :func:`printable` makes any text safe to print on a terminal.
"""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import html
import html.parser
import json
import os
import re
import subprocess
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage, Message, MIMEPart
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from gateway.dovecot import (
    PLAIN_FOLDERS,
    SPECIAL_FOLDERS,
    Installation,
    Layout,
    PasswdFile,
    find_installation,
)
from onionpost.core.errors import (
    DataDirError,
    FolderNotFound,
    MailServerError,
    UnknownLocalUser,
    UsageError,
)

__all__ = [
    "SEARCH_FIELDS",
    "Folder",
    "MailReader",
    "MessageText",
    "Summary",
    "printable",
    "render_text",
]

#: What a search word is looked for in, and doveadm's search key for it.
SEARCH_FIELDS = {
    "text": "TEXT",  # headers and body
    "body": "BODY",
    "subject": "SUBJECT",
    "from": "FROM",
    "to": "TO",
}
SearchField = Literal["text", "body", "subject", "from", "to"]

_EXTRA_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
_TIMEOUT = 60.0
#: doveadm's exit status when a mailbox (or user) does not exist (DOVEADM_EX_NOTFOUND).
_EX_NOTFOUND = 68
_SUMMARY_FIELDS = "mailbox uid flags date.received.unixtime size.physical hdr"
#: Controls that could move the cursor, retitle the terminal or reorder text on screen.
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}


# --- what is read -------------------------------------------------------------------------


@dataclass(frozen=True)
class Folder:
    """A folder and its counts (``doveadm mailbox status``)."""

    name: str
    messages: int
    unseen: int
    size: int  # bytes

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "messages": self.messages, "unseen": self.unseen,
                "size": self.size}  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """One line of a folder listing or a search result; header values decoded."""

    folder: str
    uid: int
    flags: tuple[str, ...]
    received: int  # Unix time Dovecot received the message
    size: int
    sender: str
    to: str
    subject: str
    date: str  # the Date header as written

    @property
    def seen(self) -> bool:
        return "\\Seen" in self.flags

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": self.folder,
            "uid": self.uid,
            "seen": self.seen,
            "flags": list(self.flags),
            "received": self.received,
            "size": self.size,
            "from": self.sender,
            "to": self.to,
            "subject": self.subject,
            "date": self.date,
        }


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"filename": self.filename, "content_type": self.content_type, "size": self.size}


@dataclass(frozen=True)
class MessageText:
    """A message for reading: the usual headers decoded, its text, its attachments."""

    folder: str
    uid: int
    flags: tuple[str, ...]
    raw: bytes  # as stored (LF line ends), for --raw
    headers: dict[str, str]  # From, To, Cc, Date, Subject (those present)
    text: str
    text_from: str  # "text/plain", "text/html" (tags stripped), or "" (no text part)
    attachments: list[Attachment] = field(default_factory=list)

    @property
    def seen(self) -> bool:
        return "\\Seen" in self.flags

    def to_json(self, *, raw: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "folder": self.folder,
            "uid": self.uid,
            "seen": self.seen,
            "flags": list(self.flags),
            "size": len(self.raw),
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "text": self.text,
            "text_from": self.text_from,
            "attachments": [a.to_json() for a in self.attachments],
        }
        if raw:
            out["raw_base64"] = base64.b64encode(self.raw).decode("ascii")
        return out


# --- doveadm ------------------------------------------------------------------------------


class MailReader:
    """One user's mail in a data directory, through doveadm."""

    def __init__(
        self, layout: Layout, user: str | None = None, *, installation: Installation | None = None
    ) -> None:
        self.layout = layout
        self._inst = installation
        if not layout.config.exists():
            if not layout.data_dir.exists():
                raise DataDirError(f"There is no onionpost data directory at {layout.data_dir}.")
            if not os.access(layout.data_dir, os.X_OK):
                raise self._not_allowed()
            raise DataDirError(
                f"{layout.data_dir} has no mail server configuration yet: this node has no "
                "mail gateway, or it has not run since it was set up (start it once with "
                "`onionpost run`)."
            )
        if not os.access(layout.config, os.R_OK):
            raise self._not_allowed()
        users = PasswdFile(layout).users()
        if user is None:
            if len(users) != 1:
                raise UsageError(
                    "Say whose mail to read with --user: this node has "
                    + (f"the users {', '.join(users)}." if users else "no mail users.")
                )
            user = users[0]
        elif user not in users:
            known = f" (it has {', '.join(users)})" if users else ""
            raise UnknownLocalUser(f"There is no mail user {user!r} on this node{known}.")
        self.user = user
        self.home = layout.maildir(user)
        owner = layout.mail.stat()
        self.uid, self.gid = owner.st_uid, owner.st_gid
        if os.geteuid() not in (0, self.uid):
            raise self._not_allowed()

    def _not_allowed(self) -> DataDirError:
        return DataDirError(
            f"This account may not read the mail in {self.layout.data_dir}: run the command "
            "as the node's user or as root."
        )

    @property
    def installation(self) -> Installation:
        if self._inst is None:
            self._inst = find_installation()
        return self._inst

    # -- the operations --

    def folders(self) -> list[Folder]:
        """Every folder the user has, INBOX and the standard folders first."""
        if not self.home.exists():  # no mail yet: Dovecot makes the Maildir on first use
            return [Folder("INBOX", 0, 0, 0)]
        rows = self._json("mailbox status", "messages unseen vsize", "*")
        found = [
            Folder(str(r["mailbox"]), _int(r.get("messages")), _int(r.get("unseen")),
                   _int(r.get("vsize")))
            for r in rows
        ]  # fmt: skip
        order = ["INBOX", *(name for name, _ in SPECIAL_FOLDERS), *PLAIN_FOLDERS]
        return sorted(
            found, key=lambda f: (order.index(f.name) if f.name in order else len(order), f.name)
        )

    def folder(self, name: str) -> str:
        """The folder's exact name (``inbox`` and ``sent`` are found too), or FolderNotFound."""
        names = [f.name for f in self.folders()]
        if name in names:
            return name
        folded = [n for n in names if n.casefold() == name.casefold()]
        if len(folded) == 1:
            return folded[0]
        raise FolderNotFound(
            f"{self.user} has no folder {name!r}; the folders are {', '.join(names)}."
        )

    def messages(
        self, folder: str = "INBOX", *, unread: bool = False, limit: int | None = None
    ) -> list[Summary]:
        """A folder's messages (the newest ``limit``), oldest first."""
        folder = self.folder(folder)
        if not self.home.exists():
            return []
        rows = self._json("fetch", "uid", "mailbox", folder, *(["UNSEEN"] if unread else ["ALL"]))
        uids = sorted(_int(r.get("uid")) for r in rows)
        if limit:
            uids = uids[-limit:]
        if not uids:
            return []
        found = self._summaries(["mailbox", folder, "uid", _uid_set(uids)])
        return sorted(found, key=lambda s: s.uid)

    def search(
        self,
        words: Sequence[str],
        *,
        folder: str | None = None,
        within: SearchField = "text",
        limit: int | None = None,
    ) -> list[Summary]:
        """Messages that contain every word (in ``within``), oldest first.

        Each word becomes one search key (``TEXT word``), so the words are always searched
        for, never read as Dovecot's search language.  Without ``folder``, every folder.
        """
        terms = [w for w in (w.strip() for w in words) if w]
        if not terms:
            raise UsageError("Say what to search for.")
        if any("\0" in w or "\n" in w for w in terms):
            raise UsageError("A search word cannot contain line breaks.")
        query: list[str] = ["mailbox", self.folder(folder)] if folder is not None else []
        for word in terms:
            query += [SEARCH_FIELDS[within], word]
        if not self.home.exists():
            return []
        found = sorted(self._summaries(query), key=lambda s: (s.received, s.folder, s.uid))
        return found[-limit:] if limit else found

    def message(self, folder: str, uid: int) -> MessageText:
        """One message by its folder and UID, decoded for reading."""
        folder = self.folder(folder)
        query = ["mailbox", folder, "uid", str(uid)]
        rows = self._json("fetch", "uid flags", *query) if self.home.exists() else []
        if not rows:
            raise FolderNotFound(f"There is no message {uid} in {self.user}'s {folder}.")
        flags = tuple(str(rows[0].get("flags") or "").split())
        out = self._doveadm("pager", "fetch", "text", *query)
        prefix = b"text:\n"
        if not out.startswith(prefix):
            raise MailServerError("doveadm fetch gave an answer onionpost cannot read.")
        return parse_message(folder, uid, flags, out[len(prefix) :])

    def mark_read(self, folder: str, uid: int) -> None:
        self._doveadm("flow", "flags add", "\\Seen", "mailbox", self.folder(folder), "uid",
                      str(uid))  # fmt: skip

    # -- internals --

    def _summaries(self, query: list[str]) -> list[Summary]:
        return [_summary(r) for r in self._json("fetch", _SUMMARY_FIELDS, *query)]

    def _json(self, command: str, *args: str) -> list[dict[str, Any]]:
        out = self._doveadm("json", command, *args)
        try:
            rows = json.loads(out.decode("utf-8", "replace") or "[]")
        except ValueError as exc:
            raise MailServerError(f"doveadm {command} gave an answer that is not JSON.") from exc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise MailServerError(f"doveadm {command} gave an unexpected answer.")
        return rows

    def _doveadm(self, fmt: str, command: str, *args: str) -> bytes:
        """Run ``doveadm -f FMT COMMAND -- ARGS`` as the mail account; its stdout."""
        words = command.split()  # "fetch", "mailbox status", "flags add"
        argv = [
            self.installation.doveadm,
            "-c", str(self.layout.config),
            "-o", f"mail_uid={self.uid}",
            "-o", f"mail_gid={self.gid}",
            "-o", f"mail_home={self.home}",
            "-f", fmt,
            *words,
            # 2.4 wants to be told that no userdb is asked; 2.3 has no such option (and asks
            # no userdb without -u)
            *(["--no-userdb-lookup"] if self.installation.syntax == "2.4" else []),
            "--", *args,
        ]  # fmt: skip
        env = {
            "PATH": f"/usr/bin:/bin:{_EXTRA_PATH}",
            "LANG": "C.UTF-8",
            "USER": self.user,
            "HOME": str(self.home),
        }
        try:
            done = subprocess.run(  # noqa: S603 - argv built here; user words are plain args
                argv, capture_output=True, timeout=_TIMEOUT, check=False, env=env,
                stdin=subprocess.DEVNULL, cwd="/",
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise MailServerError(
                f"doveadm {command} did not answer within {_TIMEOUT:.0f} s."
            ) from exc
        except OSError as exc:
            raise MailServerError(f"Cannot run doveadm: {exc}") from exc
        if done.returncode != 0:
            why = _last_error(done.stderr)
            if done.returncode == _EX_NOTFOUND and "doesn't exist" in why:
                raise FolderNotFound(f"{self.user} has no such folder ({why}).")
            raise MailServerError(f"doveadm {command} failed: {why}")
        return done.stdout


def _last_error(stderr: bytes) -> str:
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    errors = [line for line in lines if "Error:" in line or "Fatal:" in line] or lines
    if not errors:
        return "no reason given"
    return re.sub(r"^.*?(Error|Fatal): ", "", errors[-1])


def _int(value: object) -> int:
    try:
        return int(str(value))
    except ValueError:
        return 0


def _uid_set(uids: Iterable[int]) -> str:
    """``1:3,7,9:10`` for 1 2 3 7 9 10 (sorted input)."""
    ranges: list[list[int]] = []
    for uid in uids:
        if ranges and uid == ranges[-1][1] + 1:
            ranges[-1][1] = uid
        else:
            ranges.append([uid, uid])
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges)


def _summary(row: dict[str, Any]) -> Summary:
    headers = email.message_from_string(str(row.get("hdr") or ""), policy=email.policy.compat32)
    return Summary(
        folder=str(row.get("mailbox") or ""),
        uid=_int(row.get("uid")),
        flags=tuple(str(row.get("flags") or "").split()),
        received=_int(row.get("date.received.unixtime")),
        size=_int(row.get("size.physical")),
        sender=header_text(headers, "From"),
        to=header_text(headers, "To"),
        subject=header_text(headers, "Subject"),
        date=header_text(headers, "Date"),
    )


# --- decoding -----------------------------------------------------------------------------


def decode_header_value(value: str) -> str:
    """Unfold a raw header value and decode its RFC 2047 encoded words."""
    unfolded = re.sub(r"\r?\n[ \t]+", " ", value).strip()
    try:
        return str(email.header.make_header(email.header.decode_header(unfolded)))
    except (LookupError, ValueError, UnicodeError, email.errors.HeaderParseError):
        return unfolded


def header_text(msg: Message, name: str) -> str:
    """A header's decoded value ("" when absent); several of them joined by ", "."""
    values = msg.get_all(name) or []
    out = []
    for value in values:  # compat32 gives a Header object for 8-bit bytes: str() it
        out.append(decode_header_value(str(value)))
    return ", ".join(out)


def parse_message(folder: str, uid: int, flags: tuple[str, ...], raw: bytes) -> MessageText:
    """Decode a message for reading: headers, the text part, the attachments."""
    compat = _header_section(raw)
    headers = {
        name: header_text(compat, name)
        for name in ("From", "To", "Cc", "Date", "Subject")
        if compat.get(name) is not None
    }
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    text, text_from = "", ""
    body: MIMEPart | None = None
    try:
        body = msg.get_body(preferencelist=("plain", "html"))
    except (KeyError, ValueError, LookupError):
        body = None
    if body is not None:
        text = _part_text(body)
        text_from = body.get_content_type()
        if text_from == "text/html":
            text = html_to_text(text)
    attachments = []
    try:
        parts = list(msg.iter_attachments()) if msg.is_multipart() else []
    except (KeyError, ValueError, LookupError):
        parts = []
    for part in parts:
        payload = part.get_payload(decode=True)
        attachments.append(
            Attachment(
                decode_header_value(part.get_filename() or ""),
                part.get_content_type(),
                len(payload) if isinstance(payload, bytes) else 0,
            )
        )
    return MessageText(folder, uid, flags, raw, headers, text, text_from, attachments)


def _header_section(raw: bytes) -> Message:
    """The message's headers, 8-bit ones read as UTF-8 (RFC 6532), else as Latin-1."""
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = head.decode("latin-1")
    return email.message_from_string(text + "\n\n", policy=email.policy.compat32)


def _part_text(part: MIMEPart) -> str:
    try:
        content = part.get_content()
        if isinstance(content, str):
            return content
    except (LookupError, ValueError, UnicodeError, KeyError, AssertionError):
        pass
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


class _TextOfHTML(html.parser.HTMLParser):
    _BLOCK = frozenset(("p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "blockquote"))
    _SKIP = frozenset(("script", "style", "head", "title"))

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """The words of an HTML part, for a terminal (no links followed, nothing loaded)."""
    parser = _TextOfHTML()
    parser.feed(markup)
    parser.close()
    text = html.unescape("".join(parser.out))
    return re.sub(r"\n\s*\n\s*\n+", "\n\n", "\n".join(line.strip() for line in text.split("\n")))


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """Text safe to print on a terminal: no escape sequences, no reordering controls.

    A hostile sender can put ESC sequences in a Subject (retitle the terminal, move the
    cursor, hide lines) or bidirectional overrides that disguise what is shown.  Tabs
    become spaces; other controls become U+FFFD; newlines stay only if asked for.
    """
    out = []
    for ch in text.replace("\r\n", "\n"):
        if ch == "\n" and keep_newlines:
            out.append(ch)
        elif ch in "\t\n\r":
            out.append(" " if ch != "\t" or not keep_newlines else "    ")
        elif ord(ch) in _BIDI or unicodedata.category(ch) == "Cc":
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def render_text(msg: MessageText) -> str:
    """A message as ``onionpost read FOLDER UID`` prints it."""
    lines = [f"{name}: {printable(value)}" for name, value in msg.headers.items()]
    for att in msg.attachments:
        name = printable(att.filename) or "(no name)"
        lines.append(f"Attachment: {name} ({att.content_type}, {_size(att.size)})")
    lines.append("")
    if msg.text_from == "text/html":
        lines.append("[text of the HTML part; --raw shows the message as it is]")
    elif not msg.text_from:
        lines.append("[this message has no text part; --raw shows the message as it is]")
    lines.append(printable(msg.text, keep_newlines=True).rstrip("\n"))
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"


def parsed_date(value: str) -> str:
    """The Date header as ``YYYY-MM-DD HH:MM`` (in its own zone), or as written."""
    try:
        return parsedate_to_datetime(value).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, IndexError):
        return value
