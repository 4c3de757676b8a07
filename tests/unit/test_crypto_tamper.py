"""Every byte region of every layer, altered, must fail with the error that names what happened.

L1 and L2 are altered in transit (by anyone on the path or by the inbox); L3 is altered by a
malicious *sender*, who holds a valid file key and re-encrypts an altered plaintext, so the
checks inside the encryption (body hash, signature, header structure) are reached.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from onionpost.core.crypto import envelope as env
from onionpost.core.crypto.primitives import STREAM_ABYTES, SeededRandom
from onionpost.core.errors import (
    BadSignature,
    ForwardedMessage,
    HeaderTampered,
    MalformedData,
    MessageTruncated,
    NoStanzaForDevice,
    NotForThisInbox,
    OnionpostError,
    PayloadTampered,
)
from tests.unit.crypto_world import (
    NOW,
    User,
    forge_l3,
    forged_message,
    l2_layout,
    make_user,
    open_l1,
    open_l2,
    seal_l1,
    seal_l2,
    wrap_l3_with,
)

BODY = bytes(range(256)) * 800 + b"tail"  # 204 804 bytes: the L2 and L1 streams have 4 chunks


@dataclass
class Mail:
    rng: SeededRandom
    alice: User
    bob: User
    l2: bytes
    l1: bytes


@pytest.fixture(scope="module")
def mail() -> Mail:
    rng = SeededRandom(b"tamper")
    alice = make_user("alice", 1, rng)
    bob = make_user("bob", 3, rng)  # 3 real stanzas + 1 dummy
    l2, _ = seal_l2(alice, [bob], BODY, rng)
    l1 = seal_l1(l2, bob, rng)
    return Mail(rng, alice, bob, l2, l1)


def flip(data: bytes, at: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[at] ^= mask
    return bytes(out)


def chunk_starts(stream_at: int, stream_len: int) -> list[int]:
    """Offsets of the sealed chunks of a secretstream that starts at ``stream_at``."""
    return list(range(stream_at, stream_at + stream_len, env.SEALED_CHUNK))


# --- L1 ---------------------------------------------------------------------------------------


def _l1_regions(m: Mail) -> dict[str, tuple[int, type[OnionpostError]]]:
    stream_at = env.L1_HEADER
    chunks = chunk_starts(stream_at, len(m.l1) - stream_at)
    assert len(chunks) == 4
    pad_last = len(m.l1) - STREAM_ABYTES + 1 - 1  # last plaintext byte of the last chunk
    l2_end_in_l1 = (
        stream_at + (len(m.l2) // env.CHUNK) * env.SEALED_CHUNK + 1 + len(m.l2) % env.CHUNK
    )
    assert l2_end_in_l1 <= pad_last  # there is padding, and we flip a byte of it
    regions: dict[str, tuple[int, type[OnionpostError]]] = {
        "magic": (0, MalformedData),
        "sek_id": (5, NotForThisInbox),
        "eph_pk": (20, NotForThisInbox),
        "nonce": (50, NotForThisInbox),
        "meta ciphertext": (64 + 10, NotForThisInbox),
        "meta tag": (64 + env.META_BYTES + 3, NotForThisInbox),
        "stream header": (env.L1_HEADER - 5, PayloadTampered),
        "padding": (pad_last, PayloadTampered),
    }
    for i, start in enumerate(chunks):
        regions[f"chunk {i} tag byte"] = (start, PayloadTampered)
        regions[f"chunk {i} body"] = (start + 1000, PayloadTampered)
        end = min(start + env.SEALED_CHUNK, len(m.l1))
        regions[f"chunk {i} mac"] = (end - 1, PayloadTampered)
    return regions


L1_REGIONS = [
    "magic",
    "sek_id",
    "eph_pk",
    "nonce",
    "meta ciphertext",
    "meta tag",
    "stream header",
    "padding",
    *(f"chunk {i} {part}" for i in range(4) for part in ("tag byte", "body", "mac")),
]


@pytest.mark.parametrize("region", L1_REGIONS)
@pytest.mark.parametrize("mask", [0x01, 0x80], ids=["lowbit", "highbit"])
def test_l1_region_tampered(mail: Mail, region: str, mask: int) -> None:
    at, expected = _l1_regions(mail)[region]
    with pytest.raises(expected) as err:
        open_l1(flip(mail.l1, at, mask), mail.bob)
    assert type(err.value) is expected


def _open_l1_len(l1: bytes, user: User, length: int) -> None:
    def server_key(sek_id: int) -> bytes | None:
        k = user.server.by_id(sek_id)
        return k.secret if k else None

    env.open_outer(
        io.BytesIO(l1),
        length,
        server_key=server_key,
        now=NOW,
        max_l2_bytes=1 << 30,
        l2_sink=io.BytesIO(),
    )


L1_LENGTH_CASES: dict[str, tuple[Callable[[bytes], tuple[bytes, int]], type[OnionpostError]]] = {
    # the transport delivered fewer bytes than announced
    "short source": (lambda b: (b[:-100], len(b)), MessageTruncated),
    # cut after a whole chunk and told the shorter length: no end marker
    "cut at chunk boundary": (
        lambda b: (b[: env.L1_HEADER + env.SEALED_CHUNK * 3], env.L1_HEADER + env.SEALED_CHUNK * 3),
        MessageTruncated,
    ),
    "cut mid chunk": (lambda b: (b[:-100], len(b) - 100), PayloadTampered),
    "one byte appended": (lambda b: (b + b"\x00", len(b) + 1), PayloadTampered),
    "a chunk appended": (
        lambda b: (b + b[env.L1_HEADER : env.L1_HEADER + 5000], len(b) + 5000),
        PayloadTampered,
    ),
    "too short for a header": (lambda b: (b[:100], 100), MalformedData),
    "empty": (lambda b: (b"", 0), MalformedData),
}


@pytest.mark.parametrize("case", list(L1_LENGTH_CASES))
def test_l1_truncated_or_extended(mail: Mail, case: str) -> None:
    make, expected = L1_LENGTH_CASES[case]
    data, length = make(mail.l1)
    with pytest.raises(expected) as err:
        _open_l1_len(data, mail.bob, length)
    assert type(err.value) is expected


def test_l1_chunks_reordered(mail: Mail) -> None:
    a = env.L1_HEADER
    c = env.SEALED_CHUNK
    swapped = mail.l1[:a] + mail.l1[a + c : a + 2 * c] + mail.l1[a : a + c] + mail.l1[a + 2 * c :]
    with pytest.raises(PayloadTampered):
        open_l1(swapped, mail.bob)


# --- L2 ---------------------------------------------------------------------------------------


def _stanza_index(m: Mail) -> dict[str, int]:
    """Which stanza is bob's device 0, which is device 1, which is the dummy."""
    n, _ = l2_layout(m.l2)
    ids = [int.from_bytes(m.l2[7 + i * 85 + 1 : 7 + i * 85 + 5], "big") for i in range(n)]
    own = ids.index(m.bob.target(0).spk_id)
    other = ids.index(m.bob.target(1).spk_id)
    known = {m.bob.target(i).spk_id for i in range(3)}
    dummy = next(i for i, x in enumerate(ids) if x not in known)
    return {"own": own, "other": other, "dummy": dummy}


STANZA_FIELDS = {"type": 0, "spk_id": 2, "eph_pk": 20, "wrapped key": 37 + 5, "wrapped tag": 84}

# What bob's device 0 sees when one field of one stanza is altered.  Every stanza is covered
# by the header MAC, so any change is HeaderTampered once the device has its file key.  The
# exception is the spk_id of the device's *own* stanza: that field is the only way a device
# finds its stanza, and it is authenticated data of the stanza's AEAD, so after the change no
# stanza both names and opens with this device's prekey: indistinguishable from a message
# that was never sent to it.
STANZA_EXPECTED: dict[tuple[str, str], type[OnionpostError]] = {
    (who, f): HeaderTampered for who in ("own", "other", "dummy") for f in STANZA_FIELDS
}
STANZA_EXPECTED["own", "spk_id"] = NoStanzaForDevice


def _l2_regions(m: Mail) -> dict[str, tuple[int, int, type[OnionpostError]]]:
    """region -> (offset, xor mask, expected error)."""
    n, ss_at = l2_layout(m.l2)
    assert n == 4
    stream_at = ss_at + 24
    chunks = chunk_starts(stream_at, len(m.l2) - stream_at)
    assert len(chunks) == 4
    regions: dict[str, tuple[int, int, type[OnionpostError]]] = {
        "magic": (1, 0x01, MalformedData),
        "suite": (4, 0x01, MalformedData),
        "count (not a multiple of 4)": (6, 0x01, MalformedData),
        "count (zero)": (6, 0x04, MalformedData),
        "count (more stanzas than there are)": (5, 0x01, HeaderTampered),
        "count (beyond the limit)": (5, 0x80, MalformedData),
        "header mac": (ss_at - 7, 0x01, HeaderTampered),
        "stream header": (ss_at + 3, 0x01, PayloadTampered),
        "first chunk": (chunks[0] + 100, 0x01, PayloadTampered),
        "middle chunk": (chunks[1] + 30_000, 0x01, PayloadTampered),
        "last chunk": (chunks[-1] + 10, 0x01, PayloadTampered),
        "first chunk tag byte": (chunks[0], 0x01, PayloadTampered),
        "last chunk tag byte": (chunks[-1], 0x03, PayloadTampered),
        "last chunk mac": (len(m.l2) - 1, 0x01, PayloadTampered),
    }
    where = _stanza_index(m)
    for who, idx in where.items():
        for field, off in STANZA_FIELDS.items():
            regions[f"{who} stanza {field}"] = (
                7 + idx * 85 + off,
                0x01,
                STANZA_EXPECTED[who, field],
            )
    return regions


L2_REGIONS = [
    "magic",
    "suite",
    "count (not a multiple of 4)",
    "count (zero)",
    "count (more stanzas than there are)",
    "count (beyond the limit)",
    "header mac",
    "stream header",
    "first chunk",
    "middle chunk",
    "last chunk",
    "first chunk tag byte",
    "last chunk tag byte",
    "last chunk mac",
    *(f"{who} stanza {f}" for who in ("own", "other", "dummy") for f in STANZA_FIELDS),
]


@pytest.mark.parametrize("region", L2_REGIONS)
def test_l2_region_tampered(mail: Mail, region: str) -> None:
    at, mask, expected = _l2_regions(mail)[region]
    with pytest.raises(expected) as err:
        open_l2(flip(mail.l2, at, mask), mail.bob, 0)
    assert type(err.value) is expected


def test_l2_stanza_swap_between_messages(mail: Mail) -> None:
    """A stanza from another message, for the same device, unwraps another file key."""
    other, _ = seal_l2(mail.alice, [mail.bob], b"other", mail.rng)
    own = _stanza_index(mail)["own"]
    n, _ = l2_layout(other)
    ids = [int.from_bytes(other[7 + i * 85 + 1 : 7 + i * 85 + 5], "big") for i in range(n)]
    theirs = ids.index(mail.bob.target(0).spk_id)
    lo, hi = 7 + own * 85, 7 + (own + 1) * 85
    spliced = mail.l2[:lo] + other[7 + theirs * 85 : 7 + (theirs + 1) * 85] + mail.l2[hi:]
    with pytest.raises(HeaderTampered):
        open_l2(spliced, mail.bob, 0)


def test_l2_header_of_another_message(mail: Mail) -> None:
    """Another message's whole key header with this message's payload: the payload key
    differs, so the stream fails."""
    other, _ = seal_l2(mail.alice, [mail.bob], b"other", mail.rng)
    _, ss_at = l2_layout(other)
    spliced = other[:ss_at] + mail.l2[ss_at:]
    with pytest.raises(PayloadTampered):
        open_l2(spliced, mail.bob, 0)


def _drop_last_chunk(l2: bytes) -> tuple[bytes, int]:
    """The L2 without its final (short) chunk, announced at that length: every chunk left
    authenticates, only the end marker is missing."""
    _, ss_at = l2_layout(l2)
    last = (len(l2) - ss_at - 24) % env.SEALED_CHUNK
    return l2[:-last], len(l2) - last


L2_LENGTH_CASES: dict[str, tuple[Callable[[bytes], tuple[bytes, int]], type[OnionpostError]]] = {
    "short source": (lambda b: (b[:-1], len(b)), MessageTruncated),
    "source ends in the header": (lambda b: (b[:50], len(b)), MessageTruncated),
    "last chunk dropped": (_drop_last_chunk, MessageTruncated),
    "cut mid chunk": (lambda b: (b[:-20], len(b) - 20), PayloadTampered),
    "one byte appended": (lambda b: (b + b"\x00", len(b) + 1), PayloadTampered),
    "seventeen bytes appended": (lambda b: (b + bytes(17), len(b) + 17), PayloadTampered),
    "too short for a header": (lambda b: (b[:60], 60), MalformedData),
    "too short for its stanzas": (lambda b: (b[:300], 300), MalformedData),
}


@pytest.mark.parametrize("case", list(L2_LENGTH_CASES))
def test_l2_truncated_or_extended(mail: Mail, case: str) -> None:
    make, expected = L2_LENGTH_CASES[case]
    data, length = make(mail.l2)
    with pytest.raises(expected) as err:
        open_l2(data, mail.bob, 0, length=length)
    assert type(err.value) is expected


def test_l2_chunks_reordered_or_repeated(mail: Mail) -> None:
    _, ss_at = l2_layout(mail.l2)
    a, c = ss_at + 24, env.SEALED_CHUNK
    swapped = mail.l2[:a] + mail.l2[a + c : a + 2 * c] + mail.l2[a : a + c] + mail.l2[a + 2 * c :]
    with pytest.raises(PayloadTampered):
        open_l2(swapped, mail.bob, 0)
    repeated = mail.l2[: a + c] + mail.l2[a : a + c] + mail.l2[a + c :]
    with pytest.raises(PayloadTampered):
        open_l2(repeated, mail.bob, 0)


# --- L3, altered by a malicious sender ------------------------------------------------------------


@dataclass
class Forgery:
    l3: bytes
    l2_header: bytes
    file_key: bytes
    offsets: dict[str, int]


@pytest.fixture(scope="module")
def forgery(mail: Mail) -> Forgery:
    file_key = mail.rng(32)
    l2_header = env._l2_header(file_key, mail.bob.targets(), mail.rng)
    body = b"Subject: x\r\n\r\n" + bytes(range(256)) * 300
    l3 = forge_l3(mail.alice, l2_header, body, recipients=[mail.bob.uik_pk])
    hlen = int.from_bytes(l3[:4], "big")
    local = len(mail.alice.local)
    o: dict[str, int] = {"header length": 3}
    pos = 4
    for name, size in [
        ("magic", 4),
        ("msg_id", 16),
        ("created_at", 8),
        ("expires_at", 8),
        ("sender_local length", 1),
        ("sender_local", local),
        ("sender_onion_pk", 32),
        ("sender_uik", 32),
        ("sender_device_id", 16),
        ("sender_dsk_seq", 4),
        ("sender_dsk_pk", 32),
        ("recipients count", 2),
        ("recipient", 32),
        ("recipients_hash", 32),
        ("l2_header_hash", 32),
        ("content_type", 1),
        ("extensions count", 2),
        ("body_len", 8),
    ]:
        o[name] = pos + size - 1  # the last byte of the field: low-order for integers
        pos += size
    assert pos == 4 + hlen
    o["body"] = pos + 1000
    o["body_hash"] = pos + len(body) + 5
    o["signature"] = pos + len(body) + 32 + 40
    return Forgery(l3, l2_header, file_key, o)


L3_EXPECTED: dict[str, type[OnionpostError]] = {
    "header length": MalformedData,
    "magic": MalformedData,
    "msg_id": BadSignature,
    "created_at": BadSignature,
    "expires_at": BadSignature,
    "sender_local length": MalformedData,
    "sender_local": BadSignature,
    "sender_onion_pk": BadSignature,
    "sender_uik": BadSignature,
    "sender_device_id": BadSignature,
    "sender_dsk_seq": BadSignature,
    "sender_dsk_pk": BadSignature,
    "recipients count": MalformedData,
    "recipient": BadSignature,
    "recipients_hash": BadSignature,
    "l2_header_hash": BadSignature,
    "content_type": BadSignature,
    "extensions count": MalformedData,
    "body_len": MalformedData,
    "body": PayloadTampered,
    "body_hash": PayloadTampered,
    "signature": BadSignature,
}


def _open_forged(mail: Mail, f: Forgery, l3: bytes) -> None:
    open_l2(wrap_l3_with(l3, f.l2_header, f.file_key, mail.rng), mail.bob, 0)


def test_l3_unaltered_forgery_opens(mail: Mail, forgery: Forgery) -> None:
    _open_forged(mail, forgery, forgery.l3)


@pytest.mark.parametrize("field", list(L3_EXPECTED))
def test_l3_field_altered_by_sender(mail: Mail, forgery: Forgery, field: str) -> None:
    expected = L3_EXPECTED[field]
    with pytest.raises(expected) as err:
        _open_forged(mail, forgery, flip(forgery.l3, forgery.offsets[field]))
    assert type(err.value) is expected


L3_SHAPE_CASES: dict[str, Callable[[bytes], bytes]] = {
    "trailing byte": lambda b: b + b"\x00",
    "last byte missing": lambda b: b[:-1],
    "trailer missing": lambda b: b[:-96],
    "only the length prefix": lambda b: b[:4],
    "header length beyond the limit": lambda b: (
        (env.MAX_HEADER_BYTES + 1).to_bytes(4, "big") + b[4:]
    ),
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("case", list(L3_SHAPE_CASES))
def test_l3_shape_altered_by_sender(mail: Mail, forgery: Forgery, case: str) -> None:
    with pytest.raises(MalformedData) as err:
        _open_forged(mail, forgery, L3_SHAPE_CASES[case](forgery.l3))
    assert type(err.value) is MalformedData


def test_l3_resigned_inconsistencies(mail: Mail) -> None:
    """A sender who signs whatever it likes still cannot make the checks disagree."""
    a, b = mail.alice, mail.bob
    cases: list[tuple[dict[str, object], type[OnionpostError]]] = [
        ({"recipients_hash": bytes(32)}, MalformedData),
        ({"recipients": (b.uik_pk, b.uik_pk)}, MalformedData),
        ({"l2_header_hash": bytes(32)}, ForwardedMessage),
        ({"sender_dsk_pk": a.uik_pk}, BadSignature),  # claims a key it did not sign with
    ]
    for overrides, expected in cases:
        msg = forged_message(a, b, b"body", mail.rng, fields=overrides)
        with pytest.raises(expected) as err:
            open_l2(msg, b, 0)
        assert type(err.value) is expected, overrides


def test_an_unpadded_envelope_is_refused(mail: Mail, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender that skips padding would leak the exact size; the inbox refuses its mail."""
    l2_len = len(mail.l2)
    exact = env.L1_HEADER + env.stream_length(l2_len)
    assert exact < env.outer_length(l2_len)
    monkeypatch.setattr(env, "_solve_padding", lambda n: (exact, n))
    unpadded = seal_l1(mail.l2, mail.bob, SeededRandom(b"unpadded"))
    monkeypatch.undo()
    assert len(unpadded) == exact
    with pytest.raises(MalformedData, match="padded"):
        _open_l1_len(unpadded, mail.bob, len(unpadded))
