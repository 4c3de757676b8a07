"""Messages as pymap sees them, read lazily and rendered so that none can end a session."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from email.headerregistry import AddressHeader
from typing import Any, SupportsBytes

from pymap.bytes import Writeable, WriteStream
from pymap.interfaces.message import CachedMessage
from pymap.message import BaseLoadedMessage, BaseMessage
from pymap.mime import MessageBody, MessageContent, MessageHeader
from pymap.parsing.primitives import List, Nil, String
from pymap.parsing.response.fetch import BodyStructure, ContentBodyStructure, EnvelopeStructure
from pymap.parsing.specials import DateTime, FetchRequirement, ObjectId
from pymap.parsing.specials.flag import Flag

from onionpost.store.mailbox import MailboxStore, StoredMessage

log = logging.getLogger(__name__)

_FLAGS: dict[str, Flag] = {}


def flag(name: str) -> Flag:
    """One shared Flag object per name: a large folder holds thousands of the same few."""
    found = _FLAGS.get(name)
    if found is None:
        found = _FLAGS[name] = Flag(name)
    return found


class Message(BaseMessage):
    __slots__ = ["_body_id", "_store"]

    def __init__(
        self,
        uid: int,
        internal_date: datetime,
        flags: Iterable[Flag],
        *,
        expunged: bool = False,
        email_id: ObjectId | None = None,
        store: MailboxStore | None = None,
        body_id: int = 0,
    ) -> None:
        super().__init__(uid, internal_date, flags, expunged=expunged, email_id=email_id)
        self._store = store
        self._body_id = body_id

    @classmethod
    def of(cls, stored: StoredMessage, store: MailboxStore) -> Message:
        return cls(
            stored.uid,
            datetime.fromtimestamp(stored.internal_date, UTC),
            [flag(name) for name in stored.flags],
            email_id=ObjectId(b"M%d" % stored.body_id),
            store=store,
            body_id=stored.body_id,
        )

    @classmethod
    def gone(cls, cached: CachedMessage) -> Message:
        """What pymap shows for a message expunged by another session but not yet reported."""
        if isinstance(cached, Message):
            return cls(
                cached.uid, cached.internal_date, cached.permanent_flags, expunged=True,
                email_id=cached.email_id, store=cached._store, body_id=cached._body_id,
            )  # fmt: skip
        return cls(cached.uid, cached.internal_date, cached.permanent_flags, expunged=True)

    async def load_content(self, requirement: FetchRequirement) -> _Loaded:
        return _Loaded(self, requirement, self._store, self._body_id)


class _Loaded(BaseLoadedMessage):
    """Reads the header or the whole message only when a FETCH part needs it, and renders
    ENVELOPE and BODYSTRUCTURE so that no message can make them raise."""

    def __init__(
        self,
        message: Message,
        requirement: FetchRequirement,
        store: MailboxStore | None,
        body_id: int,
    ) -> None:
        super().__init__(message, requirement, None)
        self._store = store
        self._body_id = body_id
        self._full: MessageContent | None = None
        self._head: MessageContent | None = None

    @property
    def content(self) -> MessageContent:
        if self._full is None:
            data = self._store.content(self._body_id) if self._store else b""
            self._full = _parse(data)
        return self._full

    def _header(self) -> MessageContent:
        if self._full is not None:
            return self._full
        if self._head is None:
            data = self._store.header(self._body_id) if self._store else b""
            self._head = _parse(data)
        return self._head

    def get_size(self, section: Sequence[int] | None = None) -> int:
        if section or self._store is None or self._full is not None:
            return super().get_size(section)
        return self._store.size(self._body_id)

    def get_header(self, name: bytes) -> Sequence[str]:
        try:
            return [str(value) for value in self._header().header.parsed[name]]
        except Exception:  # a header the email package cannot parse matches nothing
            return []

    def get_message_headers(
        self,
        section: Sequence[int] | None = None,
        subset: Any = None,  # noqa: ANN401 - pymap's Collection[bytes] | None
        inverse: bool = False,
    ) -> Writeable:
        if section:
            return super().get_message_headers(section, subset, inverse)
        if subset is None and self._full is None and self._head is None and self._store:
            # The whole header block, byte for byte what pymap's parse would give back.
            return Writeable.wrap(self._store.header(self._body_id))
        header = self._header().header
        if subset is None:
            return header
        fields = b"".join(
            bytes(value) for key, value in header.folded if inverse != (key.upper() in subset)
        )
        return Writeable.wrap(fields + b"\r\n")

    def get_envelope_structure(self) -> EnvelopeStructure:
        if self._store is None:
            return self._get_envelope_structure(self._header())
        cached = self._store.cached_envelope(self._body_id)
        if cached is None:
            structure = self._get_envelope_structure(self._header())
            cached = bytes(structure)
            self._store.cache_envelope(self._body_id, cached)
            return _CachedEnvelope(cached, lambda: structure)
        return _CachedEnvelope(cached, lambda: self._get_envelope_structure(self._header()))

    def get_body_structure(self) -> BodyStructure:
        return self._get_body_structure(self.content)

    def get_body(self, section: Sequence[int] | None = None, binary: bool = False) -> Writeable:
        if binary:
            try:
                return Writeable.wrap(bytes(super().get_body(section, binary=True)))
            except Exception:  # pymap cannot decode every transfer encoding: send it as is
                log.debug("BINARY fetch fell back to the encoded part")
        return super().get_body(section, binary=False)

    @classmethod
    def _get_envelope_structure(cls, msg: MessageContent) -> EnvelopeStructure:
        parsed = msg.header.parsed

        def field(name: str) -> Any:  # noqa: ANN401 - pymap's per-field header types
            try:
                return getattr(parsed, name)
            except Exception:  # an unparseable header shows as NIL
                return None

        return _SafeEnvelope(
            field("date"), field("subject"), field("from_"), field("sender"),
            field("reply_to"), field("to"), field("cc"), field("bcc"),
            field("in_reply_to"), field("message_id"),
        )  # fmt: skip

    @classmethod
    def _get_body_structure(cls, msg: MessageContent) -> BodyStructure:
        # pymap recurses through this method for every part, so each level is guarded.
        try:
            structure = super()._get_body_structure(msg)
            bytes(structure)
            bytes(structure.extended)
        except Exception:  # includes RecursionError on absurdly deep nesting
            return ContentBodyStructure(
                "application", "octet-stream", None, None, None, None, None, None, None, None,
                len(msg),
            )  # fmt: skip
        return structure


class _CachedEnvelope(EnvelopeStructure):
    """An ENVELOPE as the store kept it: FETCH writes the kept bytes; SEARCH, which reads
    the fields (subject, from_, date...), gets them parsed from the header on first use."""

    def __init__(self, data: bytes, parse: Callable[[], EnvelopeStructure]) -> None:
        # EnvelopeStructure.__init__ is not called: its fields come from __getattr__.
        self._data = data
        self._parse = parse
        self._parsed: EnvelopeStructure | None = None

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401 - pymap's per-field types
        if name.startswith("_"):
            raise AttributeError(name)
        if self._parsed is None:
            self._parsed = self._parse()
        return getattr(self._parsed, name)

    def write(self, writer: WriteStream) -> None:
        writer.write(self._data)

    def __bytes__(self) -> bytes:
        return self._data


class _SafeEnvelope(EnvelopeStructure):
    """pymap's ENVELOPE, each field rendered on its own: one that fails becomes NIL."""

    @property
    def _value(self) -> Writeable:
        builders: list[Callable[[], SupportsBytes]] = [
            self._date,
            lambda: String.build(self.subject),
            lambda: self._addresses(self.from_),
            lambda: self._first_of(self.sender, self.from_),
            lambda: self._first_of(self.reply_to, self.from_),
            lambda: self._addresses(self.to),
            lambda: self._addresses(self.cc),
            lambda: self._addresses(self.bcc),
            lambda: String.build(self.in_reply_to),
            lambda: String.build(self.message_id),
        ]
        return List([_render_or_nil(build) for build in builders])

    def _date(self) -> SupportsBytes:
        if self.date is None or self.date.datetime is None:
            return Nil()
        return DateTime(self.date.datetime)

    def _first_of(
        self, headers: Sequence[AddressHeader] | None, fallback: Sequence[AddressHeader] | None
    ) -> SupportsBytes:
        """Sender and Reply-To default to From (RFC 3501), also when they cannot be shown."""
        rendered = _render_or_nil(lambda: self._addresses(headers))
        if isinstance(rendered, Nil):
            return _render_or_nil(lambda: self._addresses(fallback))
        return rendered


def _render_or_nil(build: Callable[[], SupportsBytes]) -> Writeable:
    try:
        rendered = bytes(build())
    except Exception:  # the field cannot be shown; the rest of the envelope still can
        return Nil()
    if rendered == b"()":
        return Nil()  # an empty address list (a group with no members) is NIL in IMAP
    return Writeable.wrap(rendered)


def render_envelope(header: bytes) -> bytes:
    """The ENVELOPE a FETCH would send for a message with this header block."""
    return bytes(_Loaded._get_envelope_structure(_parse(header)))


def _parse(data: bytes) -> MessageContent:
    """pymap's MIME parse, or when that fails, the header with the body as one opaque part."""
    try:
        return MessageContent.parse(data)
    except Exception:  # includes RecursionError from nesting past the stack
        log.warning("a stored message could not be parsed; serving its body as one part")
    view = memoryview(data)
    lines = MessageContent._find_lines(data)
    header_lines, body_lines = MessageContent._split_lines(data, lines)
    try:
        header = MessageHeader._parse(data, view, header_lines)
    except Exception:  # no usable header either: everything is body
        header, body_lines = MessageHeader._parse(data, view, []), lines
    opaque = MessageBody._parse_content_type("application/octet-stream")
    return MessageContent(data, header, MessageBody(data, body_lines, opaque, []))
