"""The three message layers: signed content inside, per-device encryption, server wrap outside.

::

    L1 outer   sealed to the recipient inbox's SEK: mailbox id, anti-spam proof, expiry,
               then L2 and zero padding, streamed, so the whole is one size bucket
    L2 device  one stanza per recipient device (and per sender's other device) wrapping a
               random file key; a header MAC; the L3 plaintext streamed with secretstream
    L3 content the whole RFC 5322 message, signed by the sender's device key together with
               the recipient list and the hash of the L2 header (so a recipient cannot
               re-wrap it for someone else), the message id and its lifetime

Everything streams in 64 KiB chunks through caller-supplied ``read``/``write`` objects, so a
50 MiB message is never held in several copies.  Opening checks every layer before it
returns; on any error the caller must discard what was written to its sink.  Byte layouts
are normative and documented with vectors in ``docs/protocol.md``.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.padding import bucket
from onionpost.core.crypto.pow import Stamp
from onionpost.core.crypto.primitives import (
    AEAD_TAG_BYTES,
    STREAM_ABYTES,
    STREAM_HEADER_BYTES,
    Hasher,
    RandomSource,
    StreamOpener,
    StreamSealer,
    aead_decrypt,
    aead_encrypt,
    constant_time_equal,
    ed25519_keypair,
    ed25519_sign_expanded,
    ed25519_verify,
    hash32,
    hasher,
    kdf,
    mac32,
    system_random,
    x25519,
    x25519_public,
)
from onionpost.core.errors import (
    CryptoError,
    ForwardedMessage,
    HeaderTampered,
    InvalidLifetime,
    MalformedData,
    MessageExpired,
    MessageFromFuture,
    MessageTooLarge,
    MessageTruncated,
    NoStanzaForDevice,
    NotARecipient,
    NotForThisInbox,
    PayloadTampered,
    ReplayedMessage,
)

CHUNK = 64 * 1024
SEALED_CHUNK = CHUNK + STREAM_ABYTES
STANZA_BYTES = 85
STANZA_TYPE_X25519 = 1
MAX_STANZAS = 1024
MAX_RECIPIENTS = 256
MAX_HEADER_BYTES = 256 * 1024
MAX_EXTENSION_BYTES = 64 * 1024
MAX_BODY_BYTES = 1 << 30
MAX_LIFETIME = 30 * 86_400
CLOCK_SKEW = 600

CTX_STANZA = b"onionpost/v1/stanza"
CTX_HEADER = b"onionpost/v1/header"
CTX_PAYLOAD = b"onionpost/v1/payload"
CTX_CONTENT = b"onionpost/v1/content\x00"
CTX_RECIPIENTS = b"onionpost/v1/recipients\x00"
CTX_SERVER_META = b"onionpost/v1/server-meta"
CTX_SERVER_PAYLOAD = b"onionpost/v1/server-payload"

L2_MAGIC = b"OPr1"
L3_MAGIC = b"OPc1"
L1_MAGIC = b"OPo1"
SUITE_1 = 1

CONTENT_RFC5322 = 0
CONTENT_KEY_UPDATE = 1
#: The body is a signed introduction (:mod:`onionpost.core.crypto.introduction`), never filed as is.
CONTENT_INTRODUCTION = 2

EXT_TOKEN_GRANT = 1  # value: repeated (recipient uik 32 || token 32)
EXT_DEVICE_LIST_GOSSIP = 2  # value: repeated (recipient uik 32 || device list digest 32)
# value: empty.  Only in a copy for the sender's own other devices: the sender is also one of
# the message's recipients (To, Cc or Bcc), so the copy belongs in INBOX as well as in Sent.
EXT_ADDRESSED_TO_SELF = 4
# value: a Profile record without its avatar (the sender's "card", signed by the sender's
# UIK), so the recipient learns the sender's verified display name offline with the mail.
EXT_SENDER_PROFILE = 5

#: A hash for about the given number of bytes.  The envelope's hash passes cost about what its
#: cipher passes cost; a caller with a second core passes a factory whose hashes run beside
#: the cipher (``onionpost.base.hashing``), the default hashes in line.
HasherFactory = Callable[[int], Hasher]

#: The L3 trailer: the body's hash and the signature over the header and that hash.
TRAILER_BYTES = 32 + 64

AUTH_NONE = 0
AUTH_TOKEN = 1
AUTH_POW = 2


class Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class Writable(Protocol):
    def write(self, b: bytes, /) -> object: ...


#: A prekey the reader holds: ``(spk_id, secret)``, or ``(spk_id, secret, public)`` to spare
#: deriving the public key (an X25519 base-point multiplication) for every message.
Prekey = tuple[int, bytes] | tuple[int, bytes, bytes]

#: ``open_outer``'s key lookup: a SEK id's secret, or ``(secret, public)`` to spare deriving
#: the public key for every envelope; None for an id the inbox does not have.
ServerKeyLookup = Callable[[int], bytes | tuple[bytes, bytes] | None]


class SeenIds(Protocol):
    """The reader's memory of message ids already filed (replay protection)."""

    def seen(self, msg_id: bytes) -> bool: ...


# --- participants -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SenderKeys:
    local: str
    onion_pk: bytes
    uik_pk: bytes
    device_id: bytes
    dsk_seq: int
    dsk_seed: bytes


@dataclass(frozen=True)
class StanzaTarget:
    """One device's prekey that the file key is wrapped to."""

    spk_id: int
    spk_pk: bytes


@dataclass(frozen=True)
class ContentHeader:
    msg_id: bytes
    created_at: int
    expires_at: int
    sender_local: str
    sender_onion_pk: bytes
    sender_uik: bytes
    sender_device_id: bytes
    sender_dsk_seq: int
    sender_dsk_pk: bytes
    recipients: tuple[bytes, ...]
    recipients_hash: bytes
    l2_header_hash: bytes
    content_type: int
    extensions: tuple[tuple[int, bytes], ...]
    body_len: int

    def encode(self) -> bytes:
        w = Writer().raw(L3_MAGIC).fixed(self.msg_id, 16).u64(self.created_at).u64(self.expires_at)
        w.var8(self.sender_local.encode("ascii")).fixed(self.sender_onion_pk, 32)
        w.fixed(self.sender_uik, 32).fixed(self.sender_device_id, 16).u32(self.sender_dsk_seq)
        w.fixed(self.sender_dsk_pk, 32).u16(len(self.recipients))
        for uik in self.recipients:
            w.fixed(uik, 32)
        w.fixed(self.recipients_hash, 32).fixed(self.l2_header_hash, 32).u8(self.content_type)
        w.u16(len(self.extensions))
        for ext_type, value in self.extensions:
            w.u16(ext_type).var32(value)
        return w.u64(self.body_len).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> ContentHeader:
        r = Reader(data, "message header")
        r.magic(L3_MAGIC)
        msg_id = r.fixed(16, "message id")
        created_at = r.u64("creation time")
        expires_at = r.u64("expiry time")
        local_raw = r.var8("sender name", 64)
        if not local_raw.isascii():
            raise MalformedData("The message header's sender name is not ASCII.")
        onion_pk = r.fixed(32, "sender inbox key")
        uik = r.fixed(32, "sender identity key")
        device_id = r.fixed(16, "sender device id")
        dsk_seq = r.u32("sender key sequence number")
        dsk_pk = r.fixed(32, "sender device key")
        recipients = tuple(
            r.fixed(32, "recipient") for _ in range(r.count("recipients", MAX_RECIPIENTS))
        )
        recipients_hash = r.fixed(32, "recipients hash")
        l2_hash = r.fixed(32, "key header hash")
        content_type = r.u8("content type")
        exts: list[tuple[int, bytes]] = []
        total = 0
        for _ in range(r.count("extensions", 64)):
            ext_type = r.u16("extension type")
            value = r.var32("extension", MAX_EXTENSION_BYTES)
            total += len(value)
            exts.append((ext_type, value))
        if total > MAX_EXTENSION_BYTES:
            raise MalformedData("The message header's extensions are too large.")
        body_len = r.u64("body length")
        r.end()
        if body_len > MAX_BODY_BYTES:
            raise MessageTooLarge()
        return cls(
            msg_id,
            created_at,
            expires_at,
            local_raw.decode("ascii"),
            onion_pk,
            uik,
            device_id,
            dsk_seq,
            dsk_pk,
            recipients,
            recipients_hash,
            l2_hash,
            content_type,
            tuple(exts),
            body_len,
        )

    def extension(self, ext_type: int) -> bytes | None:
        return next((v for t, v in self.extensions if t == ext_type), None)


def recipients_hash(uiks: Sequence[bytes]) -> bytes:
    return hash32(CTX_RECIPIENTS, *sorted(uiks))


@dataclass(frozen=True)
class SealedInner:
    """What sealing L2 produced (the bytes themselves went to the sink)."""

    length: int
    #: BLAKE2b-256 of the whole L2: the inbox's dedup key and the PoW binding.  None when
    #: the caller sealed without it (``with_digest=False``) and takes it from the L2 only if
    #: it needs it (:func:`l2_digest`): a sender with a token for every recipient never does.
    digest: bytes | None
    msg_id: bytes
    expires_at: int


@dataclass(frozen=True)
class OpenedMessage:
    """A message whose every layer verified; its body was written to the caller's sink."""

    header: ContentHeader
    body_hash: bytes

    @property
    def msg_id(self) -> bytes:
        return self.header.msg_id


# --- streaming helpers ------------------------------------------------------------------------


def _segments_chunks(segments: Iterable[bytes | memoryview], size: int) -> Iterator[bytes]:
    """Yield the concatenation of ``segments`` in pieces of ``size`` (the last may be short),
    always at least one piece (an empty one for empty input).

    Each byte is copied at most once: a segment that is already one whole piece is passed on
    as is, and a piece spanning segments is joined from views of them in one copy."""
    pending: list[memoryview] = []
    have = 0
    produced = False
    for seg in segments:
        n = len(seg)
        if not n:
            continue
        produced = True
        if not have and n == size and type(seg) is bytes:
            yield seg
            continue
        view = memoryview(seg)
        pos = 0
        while pos < n:
            take = min(size - have, n - pos)
            if not have and take == size:
                yield view[pos : pos + size].tobytes()
            else:
                pending.append(view[pos : pos + take])
                have += take
                if have == size:
                    yield b"".join(pending)
                    pending.clear()
                    have = 0
            pos += take
    if have or not produced:
        yield b"".join(pending)


def _stream_seal(
    sealer: StreamSealer, segments: Iterable[bytes | memoryview], total: int, sink: Writable
) -> Iterator[bytes]:
    """Encrypt ``segments`` chunk by chunk; the chunk holding the last byte is FINAL."""
    n_chunks = max(1, -(-total // CHUNK))
    for i, chunk in enumerate(_segments_chunks(segments, CHUNK)):
        sealed = sealer.seal(chunk, final=i == n_chunks - 1)
        sink.write(sealed)
        yield sealed


def stream_length(plaintext_len: int) -> int:
    """Ciphertext bytes of a secretstream over ``plaintext_len`` bytes (header excluded)."""
    n_chunks = max(1, -(-plaintext_len // CHUNK))
    return plaintext_len + n_chunks * STREAM_ABYTES


def _read_exact(source: Readable, n: int, what: str) -> bytes:
    data = source.read(n)
    if len(data) != n:
        raise MessageTruncated(f"The {what} ends early.")
    return data


def _stream_open(
    opener: StreamOpener, source: Readable, length: int, consume: Callable[[bytes], None]
) -> None:
    """Decrypt ``length`` bytes of secretstream from ``source`` into ``consume``."""
    remaining = length
    final = False
    while remaining > 0:
        if final:
            raise PayloadTampered("The message continues after its end marker.")
        piece = _read_exact(source, min(SEALED_CHUNK, remaining), "message")
        remaining -= len(piece)
        opened = opener.open(piece)
        if opened is None:
            raise PayloadTampered()
        plain, final = opened
        consume(plain)
    if not final:
        raise MessageTruncated()


def _shuffle(items: list[bytes], rng: RandomSource) -> None:
    # One draw for every swap: the same bytes, in the same order, as one 4-byte draw each.
    draws = rng(4 * (len(items) - 1)) if len(items) > 1 else b""
    for k, i in enumerate(range(len(items) - 1, 0, -1)):
        j = int.from_bytes(draws[4 * k : 4 * k + 4], "big") % (i + 1)
        items[i], items[j] = items[j], items[i]


# --- L2: per-device encryption ------------------------------------------------------------------


def _stanza_key(shared: bytes, eph_pk: bytes, spk_pk: bytes) -> bytes:
    return kdf(shared, CTX_STANZA, eph_pk + spk_pk)


def _make_stanza(file_key: bytes, target: StanzaTarget, rng: RandomSource) -> bytes:
    eph = rng(32)
    eph_pk = x25519_public(eph)
    prefix = struct.pack(">BI", STANZA_TYPE_X25519, target.spk_id) + eph_pk
    key = _stanza_key(x25519(eph, target.spk_pk), eph_pk, target.spk_pk)
    return prefix + aead_encrypt(key, bytes(24), file_key, prefix)


def _dummy_stanza(rng: RandomSource) -> bytes:
    """Indistinguishable from a real stanza without the matching prekey."""
    r = rng(4 + 32 + 48)  # spk id, ephemeral secret, "ciphertext": one draw, same bytes
    return bytes([STANZA_TYPE_X25519]) + r[:4] + x25519_public(r[4:36]) + r[36:]


def _l2_header(file_key: bytes, targets: Sequence[StanzaTarget], rng: RandomSource) -> bytes:
    if not targets:
        raise CryptoError("A message needs at least one recipient device.")
    stanzas = [_make_stanza(file_key, t, rng) for t in targets]
    while len(stanzas) % 4:
        stanzas.append(_dummy_stanza(rng))
    if len(stanzas) > MAX_STANZAS:
        raise CryptoError(f"A message can go to at most {MAX_STANZAS} devices.")
    _shuffle(stanzas, rng)
    head = L2_MAGIC + bytes([SUITE_1]) + len(stanzas).to_bytes(2, "big") + b"".join(stanzas)
    return head + mac32(kdf(file_key, CTX_HEADER), head)


def _encrypt_l2(
    *,
    l2_header: bytes,
    file_key: bytes,
    l3_segments: Iterable[bytes | memoryview],
    l3_len: int,
    rng: RandomSource,
    sink: Writable,
    hashers: HasherFactory = hasher,
    with_digest: bool = True,
) -> tuple[int, bytes | None]:
    """Write ``l2_header`` and the encrypted L3 stream to ``sink``; return (length, digest),
    the digest None unless ``with_digest``."""
    length = len(l2_header) + STREAM_HEADER_BYTES + stream_length(l3_len)
    digest = hashers(length) if with_digest else None
    ss_header = rng(STREAM_HEADER_BYTES)
    sealer = StreamSealer(kdf(file_key, CTX_PAYLOAD), ss_header)
    for part in (l2_header, ss_header):
        sink.write(part)
        if digest is not None:
            digest.update(part)
    for sealed in _stream_seal(sealer, l3_segments, l3_len, sink):
        if digest is not None:
            digest.update(sealed)
    return length, None if digest is None else digest.digest()


def l2_digest(source: Readable, length: int, hashers: HasherFactory = hasher) -> bytes:
    """The digest :func:`seal_inner` gives with ``with_digest``, of an L2 of ``length``
    bytes read from ``source``."""
    digest = hashers(length)
    left = length
    while left:
        piece = _read_exact(source, min(CHUNK, left), "message")
        digest.update(piece)
        left -= len(piece)
    return digest.digest()


def seal_inner(
    *,
    sender: SenderKeys,
    targets: Sequence[StanzaTarget],
    recipient_uiks: Sequence[bytes],
    body: bytes | memoryview,
    created_at: int,
    expires_at: int,
    sink: Writable,
    content_type: int = CONTENT_RFC5322,
    extensions: Sequence[tuple[int, bytes]] = (),
    msg_id: bytes | None = None,
    rng: RandomSource = system_random,
    hashers: HasherFactory = hasher,
    with_digest: bool = True,
) -> SealedInner:
    """Sign ``body`` and encrypt it to ``targets`` (L3 inside L2), streaming L2 to ``sink``.

    ``recipient_uiks`` are the identities the message is addressed to (for the sender's own
    other devices, include the sender's UIK).  The signature is needed only in the trailer,
    after the body: the body is hashed while it is encrypted (beside it, with a background
    ``hashers``), and signed when the stream reaches the trailer.
    """
    body_view = memoryview(body)
    if len(body_view) > MAX_BODY_BYTES:
        raise MessageTooLarge()
    if not created_at <= expires_at <= created_at + MAX_LIFETIME:
        raise CryptoError("A message's lifetime must be between 0 and 30 days.")
    uiks = tuple(sorted(set(recipient_uiks)))
    if not uiks or len(uiks) > MAX_RECIPIENTS:
        raise CryptoError(f"A message needs 1 to {MAX_RECIPIENTS} recipients.")
    file_key = rng(32)
    l2_header = _l2_header(file_key, targets, rng)
    msg_id = msg_id or rng(16)
    dsk_pk, dsk_sk = ed25519_keypair(sender.dsk_seed)  # one derivation for the key and the sign
    header = ContentHeader(
        msg_id=msg_id,
        created_at=created_at,
        expires_at=expires_at,
        sender_local=sender.local,
        sender_onion_pk=sender.onion_pk,
        sender_uik=sender.uik_pk,
        sender_device_id=sender.device_id,
        sender_dsk_seq=sender.dsk_seq,
        sender_dsk_pk=dsk_pk,
        recipients=uiks,
        recipients_hash=recipients_hash(uiks),
        l2_header_hash=hash32(l2_header),
        content_type=content_type,
        extensions=tuple(extensions),
        body_len=len(body_view),
    ).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise CryptoError("The message header is too large.")
    body_hasher: Hasher | None = None
    if isinstance(body, bytes):  # PyNaCl's hash takes bytes; a view is hashed in line below
        body_hasher = hashers(len(body))
        body_hasher.update(body)

    def trailer() -> Iterator[bytes]:
        body_hash = hash32(body_view) if body_hasher is None else body_hasher.digest()
        yield body_hash + ed25519_sign_expanded(dsk_sk, CTX_CONTENT + header + body_hash)

    prefix = len(header).to_bytes(4, "big") + header
    l3_len = len(prefix) + len(body_view) + TRAILER_BYTES
    length, digest = _encrypt_l2(
        l2_header=l2_header,
        file_key=file_key,
        l3_segments=itertools.chain((prefix, body_view), trailer()),
        l3_len=l3_len,
        rng=rng,
        sink=sink,
        hashers=hashers,
        with_digest=with_digest,
    )
    return SealedInner(length, digest, msg_id, expires_at)


class _ContentParser:
    """Consumes decrypted L3 bytes: header, then body (to the sink), then the trailer."""

    def __init__(self, sink: Writable, hashers: HasherFactory) -> None:
        self._sink = sink
        self._hashers = hashers
        self._buf = bytearray()  # the header being gathered (its length prefix included)
        self._want = 4  # bytes of _buf needed before the next step of header parsing
        self.header: ContentHeader | None = None
        self.header_bytes = b""
        self._body_left = 0
        self._hasher: Hasher = hasher(0)  # replaced once the header gives the body length
        self.trailer = b""

    def feed(self, data: bytes) -> None:
        pos, n = 0, len(data)
        while pos < n:
            if self.header is None:
                take = min(self._want - len(self._buf), n - pos)
                self._buf += memoryview(data)[pos : pos + take]
                pos += take
                if len(self._buf) == self._want:
                    self._header_step()
            elif self._body_left:
                take = min(self._body_left, n - pos)
                # A whole decrypted chunk of body goes to the sink as is, without a copy.
                piece = data if take == n else data[pos : pos + take]
                self._sink.write(piece)
                self._hasher.update(piece)
                self._body_left -= take
                pos += take
            else:
                if len(self.trailer) + n - pos > TRAILER_BYTES:
                    raise MalformedData("The message has data after its signature.")
                self.trailer += data[pos:]
                pos = n

    def _header_step(self) -> None:
        if self._want == 4:
            hlen = int.from_bytes(self._buf, "big")
            if hlen > MAX_HEADER_BYTES:
                raise MalformedData("The message header is too large.")
            self._want = 4 + hlen
            if hlen:
                return
        self.header_bytes = bytes(self._buf[4:])
        self.header = ContentHeader.parse(self.header_bytes)
        self._buf = bytearray()
        self._body_left = self.header.body_len
        self._hasher = self._hashers(self._body_left)

    def body_hash(self) -> bytes:
        return self._hasher.digest()

    def complete(self) -> bool:
        return (
            self.header is not None and self._body_left == 0 and len(self.trailer) == TRAILER_BYTES
        )


def open_inner(
    source: Readable,
    length: int,
    *,
    prekeys: Sequence[Prekey],
    reader_uik: bytes,
    now: int,
    seen: SeenIds,
    sink: Writable,
    hashers: HasherFactory = hasher,
) -> OpenedMessage:
    """Open an L2 of ``length`` bytes with this device's prekey secrets ``(spk_id, secret)``.

    Checks, in order: stanza, header MAC, every chunk and the end marker, the signature,
    that ``reader_uik`` is a recipient, the binding to this L2 header, the time window, and
    replay.  Membership comes before the binding so that a copy re-wrapped for an outsider
    reads "not addressed to you" (the Davis forwarding case), and a re-wrapped copy of mail
    that *was* addressed to the reader reads "forwarded".  The body is written to ``sink`` as
    it is decrypted; discard it on any error.  The caller must still check that the sender's
    device key (``header.sender_dsk_pk`` at ``sender_dsk_seq``) belongs to the sender's
    identity, from the sender's verified bundle.
    """
    fixed = 4 + 1 + 2
    if length < fixed + 32 + STREAM_HEADER_BYTES + STREAM_ABYTES:
        raise MalformedData("The message is too short to be an onionpost message.")
    head = _read_exact(source, fixed, "message")
    if head[:4] != L2_MAGIC:
        raise MalformedData("This is not an onionpost message (wrong type marker).")
    if head[4] != SUITE_1:
        raise MalformedData(f"The message uses cipher suite {head[4]}, which this version lacks.")
    n = int.from_bytes(head[5:7], "big")
    if n == 0 or n % 4 or n > MAX_STANZAS:
        raise MalformedData(f"The message has an invalid number of key stanzas ({n}).")
    if length < fixed + n * STANZA_BYTES + 32 + STREAM_HEADER_BYTES + STREAM_ABYTES:
        raise MalformedData("The message is too short for its key stanzas.")
    stanzas = _read_exact(source, n * STANZA_BYTES, "message")
    mac = _read_exact(source, 32, "message")
    header = head + stanzas

    file_key = _unwrap_file_key(stanzas, n, prekeys)
    if not constant_time_equal(mac32(kdf(file_key, CTX_HEADER), header), mac):
        raise HeaderTampered()
    l2_header = header + mac

    ss_header = _read_exact(source, STREAM_HEADER_BYTES, "message")
    opener = StreamOpener(kdf(file_key, CTX_PAYLOAD), ss_header)
    parser = _ContentParser(sink, hashers)
    _stream_open(opener, source, length - len(l2_header) - STREAM_HEADER_BYTES, parser.feed)
    if not parser.complete() or parser.header is None:
        raise MalformedData("The message's signed content is incomplete.")
    h = parser.header
    body_hash = parser.body_hash()
    if not constant_time_equal(parser.trailer[:32], body_hash):
        raise PayloadTampered("The message body does not match the hash its sender signed.")
    ed25519_verify(
        h.sender_dsk_pk,
        CTX_CONTENT + parser.header_bytes + body_hash,
        parser.trailer[32:],
        "message",
    )
    if h.recipients_hash != recipients_hash(h.recipients) or len(set(h.recipients)) != len(
        h.recipients
    ):
        raise MalformedData("The message's recipient list does not match its hash.")
    if reader_uik not in h.recipients:
        raise NotARecipient()
    if not constant_time_equal(h.l2_header_hash, hash32(l2_header)):
        raise ForwardedMessage()
    check_lifetime(h.created_at, h.expires_at, now)
    if seen.seen(h.msg_id):
        raise ReplayedMessage()
    return OpenedMessage(h, body_hash)


def check_lifetime(created_at: int, expires_at: int, now: int) -> None:
    if expires_at < created_at or expires_at - created_at > MAX_LIFETIME:
        raise InvalidLifetime()
    if created_at > now + CLOCK_SKEW:
        raise MessageFromFuture()
    if now > expires_at:
        raise MessageExpired()


def _unwrap_file_key(stanzas: bytes, n: int, prekeys: Sequence[Prekey]) -> bytes:
    secrets_by_id: dict[int, list[tuple[bytes, bytes | None]]] = {}
    for spk_id, secret, *public in prekeys:
        secrets_by_id.setdefault(spk_id, []).append((secret, public[0] if public else None))
    candidate_failed = False
    for i in range(n):
        st = stanzas[i * STANZA_BYTES : (i + 1) * STANZA_BYTES]
        candidates = secrets_by_id.get(int.from_bytes(st[1:5], "big"), ())
        if st[0] != STANZA_TYPE_X25519:
            # Suite 1 has one stanza type; one that names our prekey but not that type was
            # altered (the type byte is authenticated data of the stanza).
            candidate_failed = candidate_failed or bool(candidates)
            continue
        for secret, spk_pk in candidates:
            eph_pk = st[5:37]
            try:
                shared = x25519(secret, eph_pk)
            except CryptoError:
                candidate_failed = True
                continue
            key = _stanza_key(shared, eph_pk, spk_pk or x25519_public(secret))
            file_key = aead_decrypt(key, bytes(24), st[37:], st[:37])
            if file_key is not None and len(file_key) == 32:
                return file_key
            candidate_failed = True
    if candidate_failed:
        raise HeaderTampered("The key stanza for this device was altered in transit.")
    raise NoStanzaForDevice()


# --- L1: the server wrap --------------------------------------------------------------------

L1_FIXED = 4 + 4 + 32 + 24  # magic, sek_id, eph_pk, meta nonce
META_BYTES = 16 + 1 + 32 + 1 + 4 + 8 + 8 + 8
L1_HEADER = L1_FIXED + META_BYTES + AEAD_TAG_BYTES + STREAM_HEADER_BYTES


@dataclass(frozen=True)
class OuterMeta:
    mailbox_id: bytes
    auth_kind: int
    token: bytes
    stamp: Stamp | None
    not_after: int
    l2_len: int
    l2_digest: bytes
    sek_id: int


def _server_keys(shared: bytes, eph_pk: bytes, sek_pk: bytes) -> tuple[bytes, bytes]:
    salt = eph_pk + sek_pk
    return kdf(shared, CTX_SERVER_META, salt), kdf(shared, CTX_SERVER_PAYLOAD, salt)


def outer_length(l2_len: int) -> int:
    """The padded L1 size for an L2 of ``l2_len`` bytes."""
    return _solve_padding(l2_len)[0]


def _solve_padding(l2_len: int) -> tuple[int, int]:
    """(total L1 length, padded stream plaintext length) for the smallest reachable bucket."""
    target = bucket(L1_HEADER + stream_length(l2_len))
    while True:
        room = target - L1_HEADER
        for chunks in (-(-room // SEALED_CHUNK), -(-room // SEALED_CHUNK) - 1):
            plain = room - chunks * STREAM_ABYTES
            if chunks >= 1 and plain >= l2_len and max(1, -(-plain // CHUNK)) == chunks:
                return target, plain
        target += 1  # a few totals cannot be hit exactly; the next byte always can


def seal_outer(
    l2_source: Readable,
    l2_len: int,
    *,
    sek_id: int,
    sek_pk: bytes,
    mailbox_id: bytes,
    not_after: int,
    sink: Writable,
    token: bytes | None = None,
    stamp: Stamp | None = None,
    rng: RandomSource = system_random,
) -> int:
    """Seal an L2 (read from ``l2_source``) to an inbox's SEK; return the L1 length written."""
    if token is not None and stamp is not None:
        raise CryptoError("An envelope carries either a contact token or a stamp, not both.")
    if len(mailbox_id) != 16:
        raise CryptoError("A mailbox id is 16 bytes.")
    total, plain_len = _solve_padding(l2_len)
    eph = rng(32)
    eph_pk = x25519_public(eph)
    meta_key, stream_key = _server_keys(x25519(eph, sek_pk), eph_pk, sek_pk)
    auth = AUTH_TOKEN if token is not None else AUTH_POW if stamp is not None else AUTH_NONE
    meta = (
        Writer()
        .fixed(mailbox_id, 16)
        .u8(auth)
        .fixed(token if token is not None else bytes(32), 32)
        .u8(stamp.bits if stamp else 0)
        .u32(stamp.day if stamp else 0)
        .u64(stamp.nonce if stamp else 0)
        .u64(not_after)
        .u64(l2_len)
        .getvalue()
    )
    nonce = rng(24)
    fixed = L1_MAGIC + sek_id.to_bytes(4, "big") + eph_pk + nonce
    ss_header = rng(STREAM_HEADER_BYTES)
    for part in (fixed, aead_encrypt(meta_key, nonce, meta, fixed), ss_header):
        sink.write(part)
    sealer = StreamSealer(stream_key, ss_header)
    segments = _read_then_pad(l2_source, l2_len, plain_len - l2_len)
    for _ in _stream_seal(sealer, segments, plain_len, sink):
        pass
    return total


def _read_then_pad(source: Readable, length: int, pad: int) -> Iterator[bytes]:
    """``length`` bytes read from ``source`` in chunks, then ``pad`` zero bytes."""
    left = length
    while left:
        piece = source.read(min(CHUNK, left))
        if not piece:
            raise CryptoError("The message to wrap ended early.")
        left -= len(piece)
        yield piece
    while pad:
        n = min(CHUNK, pad)
        yield bytes(n)
        pad -= n


_ZEROS = memoryview(bytes(CHUNK))


def _check_zeros(plain: bytes, start: int) -> None:
    """Refuse padding (``plain`` from ``start`` on) that is not all zero bytes.

    A memcmp against a zero buffer, without copying ``plain`` (``bytes.strip`` walks it byte
    by byte: about 100x slower)."""
    n = len(plain) - start
    if n and not plain.endswith(_ZEROS[:n]):
        raise MalformedData("The envelope's padding is not zeros.")


def open_outer(
    source: Readable,
    length: int,
    *,
    server_key: ServerKeyLookup,
    now: int,
    max_l2_bytes: int,
    l2_sink: Writable,
    hashers: HasherFactory = hasher,
) -> OuterMeta:
    """Unwrap an L1 of ``length`` bytes with the inbox's SEK (looked up by id); write the L2
    to ``l2_sink``.  The anti-spam proof is returned for the caller to check against its
    own policy (it needs the mailbox's settings)."""
    if length < L1_HEADER + STREAM_ABYTES:
        raise MalformedData("The envelope is too short to be an onionpost envelope.")
    fixed = _read_exact(source, L1_FIXED, "envelope")
    if fixed[:4] != L1_MAGIC:
        raise MalformedData("This is not an onionpost envelope (wrong type marker).")
    sek_id = int.from_bytes(fixed[4:8], "big")
    found = server_key(sek_id)
    if found is None:
        raise NotForThisInbox(
            "The message was sealed to a server key this inbox does not have (it may have "
            "expired); the sender should fetch fresh keys."
        )
    eph_pk, nonce = fixed[8:40], fixed[40:64]
    secret, sek_pk = found if isinstance(found, tuple) else (found, x25519_public(found))
    meta_key, stream_key = _server_keys(x25519(secret, eph_pk), eph_pk, sek_pk)
    meta = aead_decrypt(
        meta_key, nonce, _read_exact(source, META_BYTES + AEAD_TAG_BYTES, "envelope"), fixed
    )
    if meta is None:
        raise NotForThisInbox()
    r = Reader(meta, "envelope metadata")
    mailbox_id = r.fixed(16, "mailbox id")
    auth = r.u8("proof kind")
    token = r.fixed(32, "token")
    bits, day, nonce_v = r.u8("difficulty"), r.u32("day"), r.u64("nonce")
    not_after = r.u64("expiry")
    l2_len = r.u64("length")
    r.end()
    if auth not in (AUTH_NONE, AUTH_TOKEN, AUTH_POW):
        raise MalformedData("The envelope's anti-spam proof is of an unknown kind.")
    if now > not_after:
        raise MessageExpired()
    if l2_len > max_l2_bytes:
        raise MessageTooLarge(
            f"The message is {l2_len} bytes; this inbox accepts at most {max_l2_bytes}."
        )
    if stream_length(l2_len) > length - L1_HEADER:
        # The length is authenticated (it is in the metadata), so this is a cut envelope.
        raise MessageTruncated("The envelope is shorter than the message it claims to carry.")
    opener = StreamOpener(stream_key, _read_exact(source, STREAM_HEADER_BYTES, "envelope"))
    digest = hashers(l2_len)
    state = {"left": l2_len}

    def consume(plain: bytes) -> None:
        left = state["left"]
        take = min(left, len(plain))
        if take:
            piece = plain[:take]
            l2_sink.write(piece)
            digest.update(piece)
            state["left"] = left - take
        _check_zeros(plain, take)

    _stream_open(opener, source, length - L1_HEADER, consume)
    if length != outer_length(l2_len):
        # Padding hides the message size only if every sender pads; refuse those who do not.
        raise MalformedData("The envelope is not padded to its size bucket.")
    stamp = Stamp(bits, day, nonce_v) if auth == AUTH_POW else None
    return OuterMeta(
        mailbox_id,
        auth,
        token if auth == AUTH_TOKEN else b"",
        stamp,
        not_after,
        l2_len,
        digest.digest(),
        sek_id,
    )
