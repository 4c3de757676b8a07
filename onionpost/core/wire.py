"""What travels between nodes besides envelopes: status bodies and key updates.  Pure.

Every refusal is a JSON object ``{"status": "temporary"|"permanent", "code": "4.2.2",
"reason": "...", "message": "..."}``: the enhanced status code (RFC 3463) and the sentence go
back to the sender's outbox unchanged, so the person who sent the mail reads the recipient
inbox's own words in a delay notice or a bounce.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from onionpost.core import quota
from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.keys import (
    DeviceList,
    Profile,
    RotationRecord,
    ServerBinding,
    SignedPrekey,
)
from onionpost.core.errors import (
    BadRequest,
    CodeRefused,
    DeviceRefused,
    DiskFull,
    InviteChainRefused,
    MalformedData,
    MessageTooLarge,
    OnionpostError,
    PeerProtocolError,
    PermanentDeliveryError,
    StaleRecipientKeys,
    TemporaryDeliveryError,
    TooManyCodeAttempts,
    UnknownMailbox,
)

MAX_JSON_BYTES = 256 * 1024
_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


def refusal(exc: OnionpostError) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for an error answered to a peer or a device.

    The JSON body is what a peer acts on (:func:`error_from_body`); the HTTP status only
    names the kind of refusal for people reading logs and for plain HTTP tools: 403 device
    refused, 404 no such mailbox, 413 too large, 507 mailbox full (or no room for another
    device, or the inbox's disk nearly full), 429 rate limited, 503 other temporary, 400
    other permanent.
    """
    temporary = exc.temporary
    code = exc.code
    # The inbox carries a store or envelope error across to the peer as a DeliveryError whose
    # reason is the original class name (DeliveryError.from_error), so both forms are checked.
    carried = getattr(exc, "reason", "")
    if isinstance(exc, DeviceRefused):
        status = 403
    elif isinstance(exc, UnknownMailbox):
        status = 404
    elif isinstance(exc, MessageTooLarge) or carried == MessageTooLarge.__name__:
        status = 413
    elif quota.is_full(exc) or isinstance(exc, DiskFull) or carried == DiskFull.__name__:
        status = quota.FULL_STATUS
    elif temporary:
        status = 429 if code.endswith(".7.0") and not isinstance(exc, StaleRecipientKeys) else 503
    else:
        status = 400
    reason = getattr(exc, "reason", type(exc).__name__)
    return status, {
        "status": "temporary" if temporary else "permanent",
        "code": code,
        "reason": reason,
        "message": str(exc),
    }


def parse_json(raw: bytes, what: str) -> dict[str, Any]:
    """Parse a JSON object a server answered, whose bytes are untrusted.

    Raises :class:`PeerProtocolError`: temporary, since the peer may be mid-upgrade.
    """
    return _json_object(raw, what, PeerProtocolError)


def parse_request_json(raw: bytes) -> dict[str, Any]:
    """Parse a JSON object a client sent to the node API.

    Raises :class:`BadRequest`: the same bytes will never parse, so the answer is a permanent
    400, not the temporary refusal a broken *answer* gets.
    """
    return _json_object(raw, "request", BadRequest)


def _json_object(raw: bytes, what: str, error: type[OnionpostError]) -> dict[str, Any]:
    if len(raw) > MAX_JSON_BYTES:
        raise error(f"The {what} is larger than {MAX_JSON_BYTES} bytes.")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"The {what} is not valid JSON.") from exc
    if not isinstance(value, dict):
        raise error(f"The {what} is not a JSON object.")
    return value


def error_from_body(http_status: int, body: bytes) -> OnionpostError:
    """Turn a peer's refusal into the matching error, keeping its code and words."""
    try:
        data = parse_json(body, "reply")
    except PeerProtocolError:
        data = {}
    return error_from_fields(http_status, data)


def error_from_fields(http_status: int, data: dict[str, Any]) -> OnionpostError:
    """:func:`error_from_body` for a refusal already parsed (one result of a
    ``POST /v1/deliveries`` answer, whose ``http`` is the status it would have had alone)."""
    status = data.get("status")
    code = data.get("code")
    message = data.get("message")
    reason = data.get("reason")
    if not isinstance(code, str) or not _CODE.match(code):
        code = "4.4.0" if http_status >= 500 or http_status == 429 else "5.0.0"
    if not isinstance(message, str) or not message.strip():
        message = f"The recipient's inbox answered HTTP {http_status} without an explanation."
    message = " ".join(message.split())[:500]
    reason = reason if isinstance(reason, str) and len(reason) <= 64 else None
    if status not in ("temporary", "permanent"):
        status = "temporary" if http_status >= 500 or http_status == 429 else "permanent"
    if reason == "stale-keys":
        return StaleRecipientKeys(message, code=code)
    for known in (CodeRefused, TooManyCodeAttempts, InviteChainRefused):
        if reason == known.reason:
            return known(message)
    if status == "temporary":
        return TemporaryDeliveryError(message, code=code, reason=reason)
    if http_status == 404 and reason == "unknown-mailbox":
        return UnknownMailbox(message, code=code)
    return PermanentDeliveryError(message, code=code, reason=reason)


# --- key updates ----------------------------------------------------------------------------


@dataclass
class KeyUpdate:
    """Records a device publishes to its inbox; each is verified before it is installed."""

    MAGIC = b"OPku"

    device_list: DeviceList | None = None
    binding: ServerBinding | None = None
    profile: Profile | None = None
    rotations: list[RotationRecord] = field(default_factory=list)
    prekeys: list[SignedPrekey] = field(default_factory=list)

    def encode(self) -> bytes:
        w = Writer().raw(self.MAGIC)
        w.var32(self.device_list.encode() if self.device_list else b"")
        w.var16(self.binding.encode() if self.binding else b"")
        w.var32(self.profile.encode() if self.profile else b"")
        w.u16(len(self.rotations))
        for rec in self.rotations:
            w.var16(rec.encode())
        w.u16(len(self.prekeys))
        for p in self.prekeys:
            w.var16(p.encode())
        return w.getvalue()

    @classmethod
    def parse(cls, data: bytes) -> KeyUpdate:
        r = Reader(data, "key update")
        r.magic(cls.MAGIC)
        dl = r.var32("device list", 256 * 1024)
        binding = r.var16("server binding")
        profile = r.var32("profile", 128 * 1024)
        rotations = [
            RotationRecord.parse(r.var16("rotation")) for _ in range(r.count("rotations", 4096))
        ]
        prekeys = [SignedPrekey.parse(r.var16("prekey")) for _ in range(r.count("prekeys", 256))]
        r.end()
        return cls(
            DeviceList.parse(dl) if dl else None,
            ServerBinding.parse(binding) if binding else None,
            Profile.parse(profile) if profile else None,
            rotations,
            prekeys,
        )


def hex_field(data: dict[str, Any], name: str, length: int | None = None) -> bytes:
    """A hex-encoded bytes field of a JSON request, validated."""
    value = data.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (length is not None and len(raw) != length):
        size = f" of {length} bytes" if length else ""
        raise MalformedData(f"The request's '{name}' must be hex{size}.")
    return raw


def int_field(data: dict[str, Any], name: str, *, low: int = 0, high: int = 1 << 62) -> int:
    value = data.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise MalformedData(f"The request's '{name}' must be a whole number.")
    return value


# -- GET /v1/device/pending (§17.3) -----------------------------------------------------------

#: A pending list names at most this many messages, the oldest: a device with a backlog
#: asks again when it has taken them.  Each list costs the device a round trip to its inbox
#: (over tor, hundreds of milliseconds) and ends with its acknowledgements awaited, so a
#: long one keeps a backlog's fetches flowing; 512 entries are ~30 KB of JSON.
PENDING_LIST_MAX = 512

# -- GET /v1/device/messages (§17.3) ----------------------------------------------------------

#: At most this many ids per ``GET /v1/device/messages``.
MAX_FETCH_IDS = 64
#: In its answer, each envelope follows its spool id and its length, two u64.
MESSAGE_FRAME_HEAD = 16


def message_frame_head(spool_id: int, size: int) -> bytes:
    """What precedes one envelope in a ``GET /v1/device/messages`` answer."""
    return Writer().u64(spool_id).u64(size).getvalue()


def parse_message_frame_head(head: bytes) -> tuple[int, int]:
    """(spool id, size) from :func:`message_frame_head`'s bytes."""
    r = Reader(head, "batch of messages")
    spool_id, size = r.u64("spool id"), r.u64("length")
    r.end()
    return spool_id, size


# -- GET /v1/device/pending-mail (§17.3) ------------------------------------------------------

#: Its answer starts with the length of the pending list's JSON, a u32.
PENDING_LIST_HEAD = 4


def pending_list_head(length: int) -> bytes:
    """What precedes the pending list's JSON in a ``GET /v1/device/pending-mail`` answer."""
    return Writer().u32(length).getvalue()


def parse_pending_list_head(head: bytes) -> int:
    r = Reader(head, "pending mail")
    length = r.u32("length")
    r.end()
    return length


def first_that_fit(sizes: list[tuple[int, int]], count: int, limit: int) -> list[int]:
    """The spool ids of the first ``(id, size)`` entries, in order, that a
    ``pending-mail`` answer carries: at most ``count`` of them, together at most ``limit``
    bytes of envelopes, stopping at the first that does not fit (so a large message is
    never passed over for the small ones behind it)."""
    out: list[int] = []
    total = 0
    for spool_id, size in sizes[:count]:
        if total + size > limit:
            break
        out.append(spool_id)
        total += size
    return out


# -- POST /v1/deliveries (§17.2) ------------------------------------------------------------

#: At most this many envelopes per ``POST /v1/deliveries``, and this many bytes of body.
MAX_DELIVERIES = 64
MAX_DELIVERIES_BYTES = 8 << 20
#: In its body, each envelope follows its length, a u32.
DELIVERY_FRAME_HEAD = 4
#: The reference sender's batches, for ``POST /v1/deliveries`` (an inbox's outbox) and
#: ``POST /v1/device/submissions`` (a device handing over) alike: up to this many envelopes
#: per request, each at most BATCHED_ENVELOPE_MAX (a larger one goes alone, streamed), so
#: at most 4 MiB of body, half the protocol's limit.
BATCH_ENVELOPES = 16
BATCHED_ENVELOPE_MAX = 256 << 10
#: How long (seconds) the reference sender sends one envelope per request to an inbox that
#: answered the batch route 404 (an older one) before it asks again (it may be upgraded).
ASK_BATCHES_AGAIN_AFTER = 3600


def delivery_frame_head(size: int) -> bytes:
    """What precedes one L1 envelope in a ``POST /v1/deliveries`` body."""
    return Writer().u32(size).getvalue()


def parse_delivery_frames(heads: Callable[[int], bytes], length: int) -> list[tuple[int, int]]:
    """(offset, size) of each envelope of a ``POST /v1/deliveries`` body of ``length``
    bytes, whose frame heads ``heads(offset)`` reads.  The frames must fill the body
    exactly, hold 1 to :data:`MAX_DELIVERIES` envelopes, none empty; anything else is
    :class:`MalformedData` for the whole request (nothing of it is stored)."""
    if length > MAX_DELIVERIES_BYTES:
        raise MessageTooLarge(
            f"The deliveries are {length} bytes; the limit is {MAX_DELIVERIES_BYTES}."
        )
    frames: list[tuple[int, int]] = []
    at = 0
    while at < length:
        if len(frames) == MAX_DELIVERIES:
            raise MalformedData(f"At most {MAX_DELIVERIES} envelopes go in one request.")
        if at + DELIVERY_FRAME_HEAD > length:
            raise MalformedData("The deliveries end inside a frame's length.")
        r = Reader(heads(at), "deliveries")
        size = r.u32("length")
        r.end()
        at += DELIVERY_FRAME_HEAD
        if size == 0 or at + size > length:
            raise MalformedData("An envelope of the deliveries is empty or runs past the end.")
        frames.append((at, size))
        at += size
    if not frames:
        raise MalformedData("The request holds no envelope.")
    return frames


# -- POST /v1/device/submissions (§17.3) -----------------------------------------------------

#: A hand-over's head (one JSON object per envelope) is at most this large.
MAX_HAND_OVERS_HEAD = 64 << 10
#: The whole body: the head's length, the head, and at most MAX_DELIVERIES_BYTES of frames.
MAX_HAND_OVERS_BYTES = 4 + MAX_HAND_OVERS_HEAD + MAX_DELIVERIES_BYTES


@dataclass(frozen=True)
class HandOverFields:
    """What ``POST /v1/device/submit`` carries in its query for one envelope; in a
    ``POST /v1/device/submissions`` body, one object of the head."""

    destination: str
    msg_id: bytes
    expires_at: int
    ref: str
    key: str

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "msg_id": self.msg_id.hex(),
            "expires_at": self.expires_at,
            "ref": self.ref,
            "key": self.key,
        }

    @classmethod
    def from_json(cls, data: object) -> HandOverFields:
        if not isinstance(data, dict):
            raise MalformedData("Each hand-over's fields must be a JSON object.")
        strings = [data.get(name, "") for name in ("destination", "ref", "key")]
        if not all(isinstance(s, str) and len(s) <= 1000 for s in strings):
            raise MalformedData("'destination', 'ref' and 'key' must be short strings.")
        destination, ref, key = strings
        return cls(
            destination=destination,
            msg_id=hex_field(data, "msg_id"),
            expires_at=int_field(data, "expires_at"),
            ref=ref,
            key=key,
        )


def hand_overs_head(fields: list[HandOverFields]) -> bytes:
    """What precedes the envelopes (each after :func:`delivery_frame_head`) in a
    ``POST /v1/device/submissions`` body: the length of the head, a u32, then the head, a
    JSON list with each envelope's fields in the envelopes' order."""
    head = json.dumps([f.to_json() for f in fields], separators=(",", ":")).encode()
    return Writer().u32(len(head)).getvalue() + head


def parse_hand_overs(
    read: Callable[[int, int], bytes], length: int
) -> list[tuple[HandOverFields, int, int]]:
    """Each envelope of a ``POST /v1/device/submissions`` body of ``length`` bytes (``read(at,
    n)`` reads it) with its fields, offset and size.  The head must name as many envelopes
    as follow it, framed as ``POST /v1/deliveries`` frames them; anything else is
    :class:`MalformedData` for the whole request (none of it is queued)."""
    if length < 4:
        raise MalformedData("The hand-overs end inside the head's length.")
    r = Reader(read(0, 4), "hand-overs")
    size = r.u32("head length")
    r.end()
    if size > MAX_HAND_OVERS_HEAD or 4 + size > length:
        raise MalformedData("The hand-overs' head is too long or runs past the end.")
    try:
        items = json.loads(read(4, size))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedData("The hand-overs' head is not JSON.") from exc
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_DELIVERIES:
        raise MalformedData(f"The hand-overs' head must list 1 to {MAX_DELIVERIES} envelopes.")
    fields = [HandOverFields.from_json(item) for item in items]
    start = 4 + size
    frames = parse_delivery_frames(lambda at: read(start + at, DELIVERY_FRAME_HEAD), length - start)
    if len(frames) != len(fields):
        raise MalformedData(
            f"The hand-overs' head names {len(fields)} envelopes; {len(frames)} follow it."
        )
    return [(f, start + at, n) for f, (at, n) in zip(fields, frames, strict=True)]
