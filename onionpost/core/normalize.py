"""Repair mail from remote peers before it is filed, so that every mail client can read it.

A peer's message arrives encrypted and signed, but its *content* was produced by whatever
program the peer runs, and our IMAP server hands it to the user's mail client as it is.
Malformed headers crash IMAP servers (pymap's ENVELOPE fails on a two-address ``Sender:``),
deep MIME nesting exhausts recursive parsers, and raw 8-bit header bytes break clients that
did not ask for UTF-8.  One bad message would then break the user's sync every time.

So this module rewrites exactly what is broken and leaves the rest byte for byte as it came:
attachments, and any signatures over them, survive.  The checks mirror how pymap and the
standard library parse mail (``email.policy.SMTP`` and its header registry), because a header
is "broken" precisely when those parsers choke on it.

It is pure: bytes and the current time in, bytes out, and it never raises.

**Large messages: the header only.**  A message over :data:`WHOLE_MESSAGE_LIMIT` is not
read whole: :func:`normalize_header` repairs its top-level header block (at most
:data:`HEADER_BLOCK_LIMIT`) and the body is filed byte for byte, streamed from a file, so a
50 MiB message is never held in memory while it is filed.  What that gives up, and why it is
safe: the IMAP server is Dovecot, whose MIME parser has its own limits (nested parts,
total parts) and treats what lies beyond them as plain body, and no onionpost code parses
the filed mail over IMAP any more; the top-level header is what clients show in message
lists and what Dovecot indexes (ENVELOPE, SEARCH), so it is still repaired.  Parts' headers,
MIME nesting and an unknown charset on a text part are left as sent: a client may show such
a part oddly, but cannot be broken by it.  Line ends stay as sent too: LMTP makes them CRLF
as it files.  A header block longer than :data:`HEADER_BLOCK_LIMIT` gets
:func:`oversized_header`: a fresh header, with the whole original kept as an attachment.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.charset
import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC
from email.header import Header
from email.headerregistry import (
    AddressHeader,
    ContentTypeHeader,
    DateHeader,
    Group,
    HeaderRegistry,
    SingleAddressHeader,
    UnstructuredHeader,
)
from email.policy import SMTP
from email.utils import formatdate
from typing import TypeGuard

__all__ = [
    "HEADER_BLOCK_LIMIT",
    "MAX_DEPTH",
    "MAX_FIELD",
    "MAX_HEADER",
    "MAX_LINE",
    "WHOLE_MESSAGE_LIMIT",
    "header_end",
    "message_id",
    "normalize",
    "normalize_header",
    "oversized_header",
]

#: RFC 5322's hard limit on a physical line (without CRLF).
MAX_LINE = 998
#: One header field, all its folded lines together; longer values are cut.
MAX_FIELD = 32 * 1024
#: One part's whole header; fields past this are dropped (the essential ones are kept).
MAX_HEADER = 128 * 1024
#: Container levels (multipart or message/rfc822) before the rest is wrapped as an attachment.
MAX_DEPTH = 20
#: MIME parts in one message before further containers are wrapped as an attachment.
MAX_PARTS = 500
#: Header bytes examined per message, over all its parts; beyond it header lines are dropped.
#: Keeps filing time bounded for a message made of nothing but millions of tiny fields.
HEADER_BUDGET = 4 * 1024 * 1024
#: Messages up to this size are normalised whole (:func:`normalize`); larger ones have their
#: top-level header repaired and their body kept byte for byte (:func:`normalize_header`).
WHOLE_MESSAGE_LIMIT = 4 * 1024 * 1024
#: Where a large message's header block must have ended (the blank line included).
HEADER_BLOCK_LIMIT = 1024 * 1024

_CRLF = b"\r\n"
_WSP = b" \t"
_FIELD_LINE = re.compile(rb"([!-9;-~]+)([ \t]*):")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([bBqQ])\?([^?\s]*)\?=")
_MSGID_TOKEN = re.compile(r"<[^<>\s]+>")
_CHARSET_PARAM = re.compile(rb"""(charset[ \t]*=[ \t]*)("[^"\r\n]*"|[^;\s"]*)""", re.IGNORECASE)

_REFOLD = SMTP.clone(refold_source="all")
_REGISTRY = HeaderRegistry()


def _parse(name: str, value: str) -> object:
    """The header object the standard registry (and so pymap) makes of a field.

    Typed as ``object`` because typeshed's header classes cannot be narrowed from BaseHeader.
    """
    return _REGISTRY(name, value)


_SINGLE_ADDRESS = frozenset({b"sender", b"resent-sender"})
_ADDRESS_LISTS = frozenset(
    {b"from", b"to", b"cc", b"bcc", b"reply-to", b"resent-from", b"resent-to", b"resent-cc",
     b"resent-bcc"}
)  # fmt: skip
#: Fields whose syntax is not free text; cutting or re-encoding them would corrupt them, so a
#: broken one is moved aside instead.
_STRUCTURED = (
    _SINGLE_ADDRESS
    | _ADDRESS_LISTS
    | {b"date", b"message-id", b"in-reply-to", b"references", b"mime-version", b"content-type",
       b"content-transfer-encoding", b"content-disposition", b"content-id", b"resent-date",
       b"resent-message-id"}
)  # fmt: skip
#: Fields pymap parses for ENVELOPE, BODYSTRUCTURE or SEARCH, and those the standard library
#: parses with a dedicated class: each must survive its parser.
_PARSED = _SINGLE_ADDRESS | _ADDRESS_LISTS | {
    b"date", b"subject", b"in-reply-to", b"references", b"message-id", b"content-type",
    b"content-disposition", b"content-language", b"content-location", b"content-id",
    b"content-description", b"content-transfer-encoding", b"mime-version", b"orig-date",
    b"resent-date",
} | {name.encode("ascii") for name in _REGISTRY.registry}  # fmt: skip
#: Structured fields that are repaired by re-rendering them through the library (which
#: encodes non-ASCII parameters per RFC 2231) rather than moved aside.
_RERENDERED = frozenset({b"content-type", b"content-disposition"})
#: Kept even when a header is over :data:`MAX_HEADER`, because clients need them to show mail.
_ESSENTIAL = _SINGLE_ADDRESS | _ADDRESS_LISTS | {
    b"subject", b"date", b"message-id", b"in-reply-to", b"references", b"mime-version",
    b"content-type", b"content-transfer-encoding", b"content-disposition", b"content-id",
    b"content-description", b"content-language", b"content-location",
}  # fmt: skip


def normalize(message: bytes, *, now: int) -> bytes:
    """Return ``message`` with everything repaired that would stop a client from reading it.

    ``now`` (seconds since the epoch) becomes the ``Date:`` of a message that has none.  A
    message that needs nothing is returned unchanged (the same object).
    """
    try:
        return _normalize(message, now)
    except Exception:  # the contract is "never raises"; fall back to a safe shape
        return _opaque(message, now)


def header_end(data: bytes) -> tuple[int, int] | None:
    """``(end, body_start)`` of the header block in ``data``: where its last line ends and
    where the body begins (after the blank line), with CRLF or bare LF, whichever comes first;
    None when ``data`` holds no blank line."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        return crlf, crlf + 4
    if lf >= 0:
        return lf, lf + 2
    return None


def normalize_header(head: bytes, *, now: int, digest: bytes) -> bytes:
    """The top-level header block ``head`` (its fields, without the blank line) repaired as
    :func:`normalize` repairs a message's, ending in CRLF CRLF: what a large message's body,
    kept as it is, follows.

    ``digest`` (of the whole message) names a ``Message-ID`` when there is none.  Never
    raises: a header that cannot be repaired is replaced by a minimal one.
    """
    try:
        data = _to_crlf(head)
        if data:
            data += _CRLF
        data += _CRLF
        walk = _Walk(data, now, changed=data is not head, digest=digest)
        found = _read_head(data, 0, len(data), top=True, budget=2 * MAX_HEADER)
        if found.body_start != len(data):  # the first line is no field: repaired line by line
            found = _Head(_group_fields(data[: -len(_CRLF) * 2].split(_CRLF)), len(data), False)
        fields, changed = _fix_header(found.fields, walk, "top")
        if not changed and found.verbatim:
            return data
        return b"".join(line + _CRLF for lines in fields for line in lines) + _CRLF
    except Exception:  # the contract is "never raises"
        return _minimal_header(now, digest)


def oversized_header(now: int, digest: bytes) -> bytes:
    """A header for a large message whose own header block does not end within
    :data:`HEADER_BLOCK_LIMIT`: the original follows it, byte for byte, as an attachment."""
    return (
        f"Date: {_date(now)}\r\nMessage-ID: <{digest.hex()[:32]}@onionpost.invalid>\r\n"
        "Subject: Message with an oversized header\r\n"
        "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="original.eml"\r\n'
        "X-Onionpost-Note: the header was over 1 MiB; the whole message is this attachment\r\n"
        "\r\n"
    ).encode("ascii")


def _minimal_header(now: int, digest: bytes) -> bytes:
    return (
        f"Date: {_date(now)}\r\nMessage-ID: <{digest.hex()[:32]}@onionpost.invalid>\r\n"
        "Subject: Unreadable message\r\n\r\n"
    ).encode("ascii")


def message_id(message: bytes) -> str | None:
    """The ``<id>`` of the top-level ``Message-ID:`` header, or None when there is none."""
    try:
        head = _head_region(message)
        for lines in _group_fields(head.split(_CRLF) if b"\r\n" in head else head.split(b"\n")):
            match = _FIELD_LINE.match(lines[0])
            if match is None or match.group(1).lower() != b"message-id":
                continue
            value = (lines[0][match.end() :] + b"".join(lines[1:])).decode("ascii", "replace")
            token = _MSGID_TOKEN.search(value)
            found = token.group(0) if token else value.strip()
            return found or None
    except Exception:  # a lookup helper; a mangled header simply has no id
        return None
    return None


# -- the walk over the MIME tree ----------------------------------------------------------


@dataclass
class _Walk:
    data: bytes
    now: int
    parts: int = 0
    changed: bool = False
    header_budget: int = HEADER_BUDGET
    digest: bytes | None = None  # of the whole message, when ``data`` is its header only


@dataclass
class _Head:
    """A part's header as found: its fields (physical lines without CRLF) and where it ends."""

    fields: list[list[bytes]] = field(default_factory=list)
    body_start: int = 0
    verbatim: bool = True  # the original header bytes can be reused as they are


def _normalize(message: bytes, now: int) -> bytes:
    data = _to_crlf(message)
    walk = _Walk(data, now, changed=data is not message)
    chunks = _part(walk, 0, len(data), 0, "top")
    if not walk.changed:
        return message
    return b"".join(chunks)


def _to_crlf(data: bytes) -> bytes:
    """Bare LF line ends become CRLF, which IMAP and every signature scheme over mail expect."""
    lf = data.count(b"\n")
    if lf == 0 or lf == data.count(_CRLF):
        return data
    return data.replace(_CRLF, b"\n").replace(b"\n", _CRLF)


def _part(walk: _Walk, start: int, end: int, depth: int, kind: str) -> list[bytes]:
    """Normalise the entity in ``data[start:end]``; ``kind`` is "top", "message" or "part"."""
    walk.parts += 1
    data = walk.data
    head = _read_head(
        data, start, end, top=kind == "top", budget=min(walk.header_budget, 2 * MAX_HEADER)
    )
    walk.header_budget -= head.body_start - start
    fields, fields_changed = _fix_header(head.fields, walk, kind)
    if fields_changed or not head.verbatim:
        walk.changed = True
        header = b"".join(line + _CRLF for lines in fields for line in lines) + _CRLF
    else:
        header = data[start : head.body_start]
    maintype, subtype, boundary = _content_type(fields)
    body_start = head.body_start
    if maintype == "multipart" and boundary is not None:
        delimiters = _delimiters(data, boundary, body_start, end, MAX_PARTS - walk.parts + 1)
        if depth >= MAX_DEPTH or walk.parts + len(delimiters) > MAX_PARTS:
            return _wrap(walk, header, data[body_start:end])
        return [header, *_multipart(walk, delimiters, body_start, end, depth)]
    if maintype == "message" and subtype == "rfc822":
        if depth >= MAX_DEPTH or walk.parts >= MAX_PARTS:
            return _wrap(walk, header, data[body_start:end])
        return [header, *_part(walk, body_start, end, depth + 1, "message")]
    if maintype == "text":
        header = _fix_charset(walk, header, fields, data[body_start:end])
    return [header, data[body_start:end]]


def _multipart(
    walk: _Walk, delimiters: list[tuple[int, int, bool]], body_start: int, end: int, depth: int
) -> list[bytes]:
    data = walk.data
    if not delimiters:
        return [data[body_start:end]]
    out = [data[body_start : delimiters[0][0]]]
    for index, (d_start, d_end, closing) in enumerate(delimiters):
        out.append(data[d_start:d_end])
        if closing:
            out.append(data[d_end:end])
            return out
        part_end = delimiters[index + 1][0] if index + 1 < len(delimiters) else end
        out.extend(_part(walk, d_end, part_end, depth + 1, "part"))
    return out


def _delimiters(
    data: bytes, boundary: bytes, start: int, end: int, limit: int
) -> list[tuple[int, int, bool]]:
    """Delimiter lines as pymap finds them: exactly ``--b`` or ``--b--`` on a line of its own.

    Stops at the first closing delimiter, as pymap does, or after ``limit`` of them.  The
    pattern starts with a literal newline so that the regex engine skips quickly through large
    attachments.
    """
    line = b"--" + re.escape(boundary) + rb"(--)?(?:\r\n|\Z)"
    found: list[tuple[int, int, bool]] = []
    at_line_start = start == 0 or data[start - 1 : start] == b"\n"
    first = re.compile(line).match(data, start, end) if at_line_start else None
    if first is not None:
        found.append((first.start(), first.end(), first.group(1) is not None))
        if found[-1][2]:
            return found
    for match in re.compile(b"\n" + line).finditer(data, start, end):
        closing = match.group(1) is not None
        found.append((match.start() + 1, match.end(), closing))
        if closing or len(found) > limit:
            break
    return found


def _wrap(walk: _Walk, header: bytes, body: bytes) -> list[bytes]:
    """Turn a container past the nesting limits into one opaque, downloadable attachment."""
    walk.changed = True
    wrapper = (
        b'Content-Type: application/octet-stream; name="nested-part.eml"\r\n'
        b'Content-Disposition: attachment; filename="nested-part.eml"\r\n'
        b"X-Onionpost-Note: MIME nesting too deep to display; kept intact as this attachment\r\n"
        b"\r\n"
    )
    return [wrapper, header, body]


def _opaque(message: bytes, now: int) -> bytes:
    """Last resort: a fresh, known-good header with the original bytes as an attachment."""
    digest = hashlib.sha256(message).hexdigest()[:32]
    head = (
        f"Date: {_date(now)}\r\nMessage-ID: <{digest}@onionpost.invalid>\r\n"
        "Subject: Unreadable message\r\nContent-Type: application/octet-stream\r\n"
        'Content-Disposition: attachment; filename="original.eml"\r\n\r\n'
    )
    return head.encode("ascii") + message


# -- reading a header ---------------------------------------------------------------------


def _head_region(message: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        index = message.find(sep)
        if index >= 0:
            return message[:index]
    return message


def _read_head(data: bytes, start: int, end: int, *, top: bool, budget: int) -> _Head:
    if data.startswith(_CRLF, start, end):
        return _Head(body_start=start + 2)
    first_end = data.find(_CRLF, start, end)
    first = data[start : end if first_end < 0 else first_end]
    if not (_FIELD_LINE.match(first) or (top and first.startswith(b"From "))):
        # No header at all: everything is body, and the separator has to be added.
        return _Head(body_start=start, verbatim=False)
    blank = data.find(b"\r\n\r\n", start, end)
    verbatim = True
    if blank >= 0:
        cut = blank if blank - start <= budget else data.rfind(_CRLF, start, start + budget)
        lines = data[start:cut].split(_CRLF) if cut > start else [first]
        if cut != blank:  # lines past the budget are dropped, except the essential fields
            verbatim = False
            lines.extend(_essential_lines(data, max(cut, start), blank))
        body_start = blank + 4
    else:
        lines, body_start = _header_lines_without_separator(data, start, end, budget)
        verbatim = False
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not line.strip(_WSP):
                verbatim = False  # whitespace-only lines end a header for pymap, not for RFC 5322
                continue
            if fields:
                fields[-1].append(line)
                continue
        fields.append([line])
    return _Head(fields, body_start, verbatim)


_ESSENTIAL_START = re.compile(
    rb"\r\n(" + b"|".join(re.escape(name) for name in sorted(_ESSENTIAL)) + rb")[ \t]*:",
    re.IGNORECASE,
)


def _essential_lines(data: bytes, start: int, end: int) -> list[bytes]:
    """The first field of each essential name in ``data[start:end]``, with its folded lines."""
    lines: list[bytes] = []
    seen: set[bytes] = set()
    for match in _ESSENTIAL_START.finditer(data, start, end):
        name = match.group(1).lower()
        if name in seen:
            continue
        seen.add(name)
        field_start = pos = match.start() + 2
        while pos - field_start <= MAX_FIELD:
            nl = data.find(_CRLF, pos, end)
            if nl < 0 or data[nl + 2 : nl + 3] not in (b" ", b"\t"):
                pos = end if nl < 0 else nl
                break
            pos = nl + 2  # a folded continuation line follows
        lines.extend(data[field_start : min(pos, field_start + MAX_FIELD)].split(_CRLF))
    return lines


def _header_lines_without_separator(
    data: bytes, start: int, end: int, budget: int
) -> tuple[list[bytes], int]:
    """Header lines up to the first line that cannot be one, where the body must begin."""
    lines: list[bytes] = []
    pos = start
    while pos < end and pos - start <= budget:
        nl = data.find(_CRLF, pos, end)
        line_end = end if nl < 0 else nl
        line = data[pos:line_end]
        if not (_FIELD_LINE.match(line) or line[:1] in (b" ", b"\t") or (pos == start)):
            return lines, pos
        lines.append(line)
        pos = end if nl < 0 else nl + 2
    return lines, pos


def _group_fields(lines: list[bytes]) -> list[list[bytes]]:
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields


# -- fixing a header ----------------------------------------------------------------------


def _fix_header(
    fields: list[list[bytes]], walk: _Walk, kind: str
) -> tuple[list[list[bytes]], bool]:
    out: list[list[bytes]] = []
    changed = False
    for lines in fields:
        fixed = _fix_field(lines)
        if len(fixed) != 1 or fixed[0] is not lines:
            changed = True
        out.extend(fixed)
    capped = _cap_header(out)
    if capped is not out:
        changed, out = True, capped
    if kind == "top":
        names = {_name(lines) for lines in out}
        added: list[list[bytes]] = []
        if b"date" not in names:
            added.append([b"Date: " + _date(walk.now).encode("ascii")])
        if b"message-id" not in names:
            whole = walk.digest if walk.digest is not None else hashlib.sha256(walk.data).digest()
            digest = whole.hex()[:32]
            added.append([b"Message-ID: <" + digest.encode("ascii") + b"@onionpost.invalid>"])
        if added:
            changed, out = True, added + out
    return out, changed


def _name(lines: list[bytes]) -> bytes:
    match = _FIELD_LINE.match(lines[0])
    return match.group(1).lower() if match else b""


#: Fields up to this many bytes have their repair remembered (:func:`_fix_field_memo`).
FIELD_MEMO_BYTES = 1024


def _fix_field(lines: list[bytes]) -> list[list[bytes]]:
    """One field in, the field(s) to write out: the same list object when nothing is wrong.

    The repair is a pure function of the field's bytes and costs the standard library's
    header parser one to three times over (about half the CPU of receiving a small message,
    issue 12), while most fields recur from message to message: From, To, MIME-Version,
    Content-Type, our own X-Onionpost-Verified.  Short fields are therefore looked up in a
    bounded memo first.
    """
    if sum(len(line) for line in lines) > FIELD_MEMO_BYTES:
        return _fix_field_uncached(lines)
    same, fixed = _fix_field_memo(tuple(lines))
    if same:
        return [lines]
    return [list(field) for field in fixed]


@functools.lru_cache(maxsize=2048)
def _fix_field_memo(lines: tuple[bytes, ...]) -> tuple[bool, tuple[tuple[bytes, ...], ...]]:
    """(True, ()) for a field that is fine as it is, else (False, the fields to write)."""
    given = list(lines)
    out = _fix_field_uncached(given)
    if len(out) == 1 and out[0] is given:
        return True, ()
    return False, tuple(tuple(field) for field in out)


def _fix_field_uncached(lines: list[bytes]) -> list[list[bytes]]:
    match = _FIELD_LINE.match(lines[0])
    if match is None:
        text, _ = _decode(b"".join(lines))
        return [_render(b"X-Broken-Header", text[:MAX_FIELD])]
    name = match.group(1)
    if len(name) > 200:
        text, _ = _decode(b"".join(lines))
        return [_render(b"X-Broken-Header", text[:MAX_FIELD])]
    lname = name.lower()
    raw = lines[0][match.end() :] + b"".join(lines[1:])
    text, dirty = _decode(raw)
    dirty = dirty or bool(match.group(2))  # "Subject :" is obsolete and misread by pymap
    if len(raw) > MAX_FIELD:
        if lname in _STRUCTURED:
            return [_aside(name, text)]
        text, dirty = text[:MAX_FIELD], True
    if lname in _ADDRESS_LISTS or lname in _SINGLE_ADDRESS:
        fixed = _fix_address(name, lname, text, dirty)
    elif lname in (b"date", b"resent-date"):
        fixed = _fix_date(name, text, dirty)
    else:
        if dirty and lname in _STRUCTURED and lname not in _RERENDERED:
            return [_aside(name, text)]
        if lname not in _STRUCTURED and _ENCODED_WORD.search(text) and _words_broken(text):
            text, dirty = _decode_words(text), True
        fixed = _render(name, text) if dirty else None
    if fixed is None:
        fixed = _fold(lines) if any(len(line) > MAX_LINE for line in lines) else lines
    if lname in _PARSED and not _plainly_parsed(lname, fixed) and not _server_can_parse(fixed):
        return [_aside(name, text)]
    return [fixed]


def _decode(raw: bytes) -> tuple[str, bool]:
    """Header bytes as text, and whether they had to be repaired (8-bit or control bytes)."""
    dirty = False
    if raw.isascii():
        text = raw.decode("ascii")
    else:
        dirty = True
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", "replace")
    if _CONTROL.search(text):
        text, dirty = _CONTROL.sub(" ", text), True
    return text.strip(" \t"), dirty


def _aside(name: bytes, text: str) -> list[bytes]:
    """Keep a field that cannot be repaired, under a name no parser interprets."""
    return _render(b"X-Original-" + name, text[:MAX_FIELD])


def _fix_address(name: bytes, lname: bytes, text: str, dirty: bool) -> list[bytes] | None:
    """None when the field is fine as it is; otherwise its repaired or moved-aside lines."""
    lines: list[bytes] | None = None
    try:
        header = _parse(name.decode("ascii"), text)
        if _addresses_usable(header, lname):
            if not dirty and not (_ENCODED_WORD.search(text) and _words_broken(text)):
                return None
            lines = _acceptable(_refold_addresses(name, header))
    except Exception:  # any parser failure means the field is moved aside
        lines = None
    return _aside(name, text) if lines is None else lines


def _addresses_usable(header: object, lname: bytes) -> TypeGuard[AddressHeader]:
    """Whether every address can be shown: exactly one where one is allowed, ASCII addr-specs."""
    if not isinstance(header, AddressHeader):
        return False
    if lname in _SINGLE_ADDRESS:
        if not isinstance(header, SingleAddressHeader):
            return False
        _ = header.address  # raises unless there is exactly one
    return all(
        address.username and address.username.isascii() and address.domain.isascii()
        for address in header.addresses
    )


def _refold_addresses(name: bytes, header: AddressHeader) -> str:
    """Rebuild an address field from its parsed groups, with display names cleaned up."""
    groups = [
        Group(
            _clean_name(group.display_name) if group.display_name else None,
            [
                type(address)(_clean_name(address.display_name), address.username, address.domain)
                for address in group.addresses
            ],
        )
        for group in header.groups
    ]
    folded: str = _REFOLD.header_factory(name.decode("ascii"), groups).fold(policy=_REFOLD)
    return folded


def _clean_name(display_name: str) -> str:
    if _ENCODED_WORD.search(display_name):
        display_name = _decode_words(display_name)
    return _CONTROL.sub(" ", display_name).strip()


def _fix_date(name: bytes, text: str, dirty: bool) -> list[bytes] | None:
    try:
        header = _parse("Date", text)
        if not isinstance(header, DateHeader) or header.datetime is None:
            return _aside(name, text)
        when = header.datetime
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        when.strftime("%d-%b-%Y %X %z").encode("ascii")
    except Exception:  # an unparseable date is moved aside
        return _aside(name, text)
    if dirty:
        return [name + b": " + _date(int(when.timestamp())).encode("ascii")]
    return None


def _date(now: int) -> str:
    try:
        return formatdate(max(0, min(now, 253_402_300_799)), usegmt=True)
    except (OverflowError, OSError, ValueError):
        return "Thu, 01 Jan 1970 00:00:00 GMT"


def _words_broken(text: str) -> bool:
    return any(_decode_word(m) is None for m in _ENCODED_WORD.finditer(text))


def _decode_word(match: re.Match[str]) -> str | None:
    """The text of one RFC 2047 encoded word, or None when its charset or payload is bad."""
    charset, encoding, payload = match.groups()
    try:
        charset = charset.split("*", 1)[0].lower()
        charset = email.charset.ALIASES.get(charset, charset)
        codecs.lookup(charset)
        if encoding in "bB":
            raw = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        else:
            raw = binascii.a2b_qp(payload.encode("ascii"), header=True)
        return raw.decode(charset)
    except Exception:  # any codec failure marks the word as broken
        return None


def _decode_words(text: str) -> str:
    """Replace every encoded word by its text, guessing for the broken ones."""
    out: list[str] = []
    pos = 0
    previous_word_end = -1
    for match in _ENCODED_WORD.finditer(text):
        gap = text[pos : match.start()]
        if not (previous_word_end == pos and gap.strip(" \t") == ""):
            out.append(gap)  # whitespace between two encoded words is not part of the text
        decoded = _decode_word(match)
        if decoded is None:
            decoded = _guess_word(match)
        out.append(decoded)
        pos = previous_word_end = match.end()
    out.append(text[pos:])
    return _CONTROL.sub(" ", "".join(out))


def _guess_word(match: re.Match[str]) -> str:
    """Best effort for a broken encoded word: its bytes as UTF-8 or Windows-1252, else as is."""
    _, encoding, payload = match.groups()
    try:
        if encoding in "bB":
            raw = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        else:
            raw = binascii.a2b_qp(payload.encode("ascii"), header=True)
    except (binascii.Error, ValueError):
        return payload
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


# -- writing a header ---------------------------------------------------------------------


def _render(name: bytes, text: str) -> list[bytes]:
    """Write a field as 7-bit, folded lines: RFC 2047 for non-ASCII text, via the library."""
    sname = name.decode("ascii")
    if _ENCODED_WORD.search(text) and _words_broken(text):
        text = _decode_words(text)  # else the library would re-emit them as unknown-8bit

    def by_policy() -> str:
        folded: str = _REFOLD.header_factory(sname, text).fold(policy=_REFOLD)
        return folded

    def by_encoded_words() -> str:
        encoded = Header(text, "utf-8", header_name=sname).encode(linesep="\r\n")
        return f"{sname}: {encoded}\r\n"

    attempts: list[Callable[[], str]] = [by_policy, by_encoded_words]
    for attempt in attempts:
        lines = _attempt(attempt)
        if lines is not None:
            return lines
    plain = text.encode("ascii", "replace")
    return _fold([name + b": " + plain])


def _attempt(render: Callable[[], str]) -> list[bytes] | None:
    try:
        return _acceptable(render())
    except Exception:  # the library has folding bugs; the caller tries the next way
        return None


def _acceptable(folded: str) -> list[bytes] | None:
    """The lines of a rendered field, if it is 7-bit, folded and free of control characters."""
    if not folded.isascii() or "unknown-8bit" in folded.lower():
        return None  # the library gave up on some bytes; unreadable for clients, and unstable
    raw = folded.encode("ascii")
    raw = raw.removesuffix(_CRLF)
    lines = raw.split(_CRLF)
    for index, line in enumerate(lines):
        if len(line) > MAX_LINE or _has_control(line):
            return None
        if index and (line[:1] not in (b" ", b"\t") or not line.strip(_WSP)):
            return None
    if not _FIELD_LINE.match(lines[0]):
        return None
    return lines


def _has_control(line: bytes) -> bool:
    return any((b < 0x20 and b != 0x09) or b == 0x7F for b in line)


def _fold(lines: list[bytes]) -> list[bytes]:
    """Break physical lines over :data:`MAX_LINE` at whitespace, or hard where there is none."""
    out: list[bytes] = []
    limit = MAX_LINE - 8
    for index, original in enumerate(lines):
        rest = original
        colon = rest.find(b":") + 1 if index == 0 else 1
        while len(rest) > MAX_LINE:
            cut = max(rest.rfind(b" ", colon + 1, limit), rest.rfind(b"\t", colon + 1, limit))
            if cut <= colon:
                out.append(rest[:limit])
                rest = b" " + rest[limit:]
            else:
                out.append(rest[:cut])
                rest = rest[cut:]
            colon = 1
        if rest.strip(_WSP) or index == 0:
            out.append(rest)
    return out


def _cap_header(fields: list[list[bytes]]) -> list[list[bytes]]:
    sizes = [sum(len(line) + 2 for line in lines) for lines in fields]
    if sum(sizes) <= MAX_HEADER:
        return fields
    keep: set[int] = set()
    seen: set[bytes] = set()
    budget = MAX_HEADER - 100
    for index, lines in enumerate(fields):
        name = _name(lines)
        if name in _ESSENTIAL and name not in seen:
            seen.add(name)
            keep.add(index)
            budget -= sizes[index]
    for index in range(len(fields)):
        if index not in keep and sizes[index] <= budget:
            keep.add(index)
            budget -= sizes[index]
    dropped = len(fields) - len(keep)
    out = [lines for index, lines in enumerate(fields) if index in keep]
    out.append([b"X-Onionpost-Dropped-Headers: %d" % dropped])
    return out


# -- what pymap will make of it -----------------------------------------------------------


#: Fields the registry parses with a class of its own (addresses, dates, MIME fields, the
#: Message-ID); every other name gets an unstructured header, which takes any plain text.
_NOT_UNSTRUCTURED = frozenset(
    name.encode("ascii")
    for name, cls in _REGISTRY.registry.items()
    if not issubclass(cls, UnstructuredHeader)
)
_PLAIN_TEXT = re.compile(rb"[\x20-\x7e\t]*")
#: ``<dot-atom@dot-atom>``, the form nearly every Message-ID has.
_PLAIN_MSGID = re.compile(
    rb"[ \t]*<[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    rb"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>[ \t]*"
)


def _plainly_parsed(lname: bytes, lines: list[bytes]) -> bool:
    """Whether the field is of a form the registry is known to parse, so that
    :func:`_server_can_parse` need not try: plain printable ASCII without encoded words in
    a field parsed as unstructured text (Subject, References, ...), or a Message-ID of the
    plain form.  The fields that differ in every message (Subject, Message-ID, References)
    miss the repair memo, and parsing them was most of the cost of normalising a small
    message (issue 12; the unit tests check that the full parse agrees)."""
    match = _FIELD_LINE.match(lines[0])
    if match is None:
        return False
    value = lines[0][match.end() :] + b"".join(lines[1:])
    if lname == b"message-id":
        return _PLAIN_MSGID.fullmatch(value) is not None
    if lname in _NOT_UNSTRUCTURED:
        return False
    return b"=?" not in value and _PLAIN_TEXT.fullmatch(value) is not None


def _server_can_parse(lines: list[bytes]) -> bool:
    """Parse the field exactly as pymap does for ENVELOPE/BODYSTRUCTURE and touch every value."""
    try:
        strings = [line.decode("ascii", "surrogateescape") for line in lines]
        name, value = SMTP.header_source_parse(strings)
        header = _parse(name, value)
        lname = name.strip().lower().encode("ascii", "replace")
        if lname in _SINGLE_ADDRESS or lname in _ADDRESS_LISTS:
            if not isinstance(header, AddressHeader):
                return False
            addresses = (
                [header.address]
                if isinstance(header, SingleAddressHeader)
                else list(header.addresses)
            )
            for address in addresses:
                str(address.display_name), str(address.username), str(address.domain)
        elif lname == b"date":
            if not isinstance(header, DateHeader) or header.datetime is None:
                return False
            header.datetime.strftime("%d-%b-%Y %X %z").encode("ascii")
        elif lname == b"content-type":
            if not isinstance(header, ContentTypeHeader):
                return False
            str(header.maintype), str(header.subtype)
            for key, val in header.params.items():
                str(key), str(val)
        str(header).encode("utf-8", "replace")
    except Exception:  # whatever pymap would trip over, we must catch here
        return False
    return True


def _content_type(fields: list[list[bytes]]) -> tuple[str, str, bytes | None]:
    """(maintype, subtype, boundary) from the first Content-Type, as pymap reads it."""
    for lines in fields:
        if _name(lines) != b"content-type":
            continue
        if sum(len(line) for line in lines) > FIELD_MEMO_BYTES:
            return _content_type_field(tuple(lines))
        return _content_type_memo(tuple(lines))
    return "text", "plain", None


@functools.lru_cache(maxsize=512)
def _content_type_memo(lines: tuple[bytes, ...]) -> tuple[str, str, bytes | None]:
    """:func:`_content_type_field`, remembered: a pure function of the field's bytes, and
    the same few Content-Type fields (text/plain; charset=...) recur in most messages, so
    the header parser runs once per distinct field instead of once per message part."""
    return _content_type_field(lines)


def _content_type_field(lines: tuple[bytes, ...]) -> tuple[str, str, bytes | None]:
    try:
        strings = [line.decode("ascii", "surrogateescape") for line in lines]
        name, value = SMTP.header_source_parse(strings)
        header = _parse(name, value)
        if not isinstance(header, ContentTypeHeader):
            return "text", "plain", None
        boundary = header.params.get("boundary")
        raw: bytes | None = None
        if isinstance(boundary, str):
            try:
                raw = boundary.encode("ascii")
            except UnicodeError:
                raw = None
        return header.maintype, header.subtype, raw or None
    except Exception:  # unparseable means the text/plain default
        return "text", "plain", None


def _known_charset(charset: str) -> bool:
    try:
        info = codecs.lookup(email.charset.ALIASES.get(charset, charset))
    except Exception:  # unknown, or a name the codec registry rejects
        return False
    return bool(getattr(info, "_is_text_encoding", True))  # base64, zlib... are not charsets


def _fix_charset(walk: _Walk, header: bytes, fields: list[list[bytes]], body: bytes) -> bytes:
    """A text part that names a charset nobody knows gets one its bytes actually decode as."""
    for lines in fields:
        if _name(lines) != b"content-type":
            continue
        value = b"".join(lines)
        match = _CHARSET_PARAM.search(value)
        if match is None:
            return header
        charset = match.group(2).strip(b'"').decode("ascii", "replace").lower()
        if _known_charset(charset):
            return header
        try:
            body.decode("utf-8")
            guess = b'"utf-8"'
        except UnicodeDecodeError:
            guess = b'"windows-1252"'
        field_at = header.find(_CRLF.join(lines))
        start = header.find(match.group(0), max(field_at, 0))
        if field_at < 0 or start < 0:
            return header
        walk.changed = True
        replacement = match.group(1) + guess
        return header[:start] + replacement + header[start + len(match.group(0)) :]
    return header
