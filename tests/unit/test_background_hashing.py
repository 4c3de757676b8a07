"""Hashes run beside the cipher (onionpost.base.hashing): same digests, same envelopes, the
same refusals, bounded memory, and errors that reach the caller."""

from __future__ import annotations

import hashlib
import io
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionpost.base import hashing
from onionpost.base.hashing import (
    BACKGROUND_MIN,
    MAX_QUEUED,
    BackgroundHasher,
    digest_in_background,
    hasher_in_background,
)
from onionpost.core.crypto.envelope import (
    HasherFactory,
    SealedInner,
    l2_digest,
    open_inner,
    open_outer,
    seal_inner,
    seal_outer,
)
from onionpost.core.crypto.primitives import SeededRandom, hash32, hasher
from onionpost.core.errors import PayloadTampered
from tests.unit.crypto_world import MAX_L2, NOW, NeverSeen, User, forged_message, world

DAY = 86_400


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=3000), max_size=40))
def test_the_digest_is_the_one_hashed_in_line(pieces: list[bytes]) -> None:
    background = BackgroundHasher(hashlib.blake2b(digest_size=32))
    for piece in pieces:
        background.update(piece)
    assert background.digest() == hash32(*pieces)


def test_large_hashes_go_to_the_background_and_small_ones_stay() -> None:
    assert isinstance(hasher_in_background(BACKGROUND_MIN), BackgroundHasher)
    assert not isinstance(hasher_in_background(BACKGROUND_MIN - 1), BackgroundHasher)
    assert isinstance(digest_in_background(hashlib.sha256, 1 << 20), BackgroundHasher)
    assert not isinstance(digest_in_background(hashlib.sha256, 10), BackgroundHasher)
    big = bytes(range(256)) * 4096
    for h in (hasher_in_background(len(big)), hasher_in_background(10)):
        h.update(big)
        assert h.digest() == hash32(big)


class _Gated:
    """A hash that waits at each piece until the test lets it go on."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list[bytes] = []

    def update(self, data: bytes, /) -> None:
        self.gate.wait(30)
        self.seen.append(data)

    def digest(self) -> bytes:
        return b"".join(self.seen)


def test_a_slow_hash_holds_the_caller_back_instead_of_queueing_the_message() -> None:
    inner = _Gated()
    h = BackgroundHasher(inner)
    h.update(b"first")  # taken by the hashing thread, which now waits at the gate
    for i in range(MAX_QUEUED):
        h.update(bytes([i]))
    blocked = threading.Event()
    done = threading.Event()

    def one_more() -> None:
        blocked.set()
        h.update(b"last")
        done.set()

    t = threading.Thread(target=one_more)
    t.start()
    blocked.wait(10)
    assert not done.wait(0.2), "the update should wait while the queue is full"
    inner.gate.set()
    t.join(10)
    assert done.is_set()
    assert h.digest() == b"first" + bytes(range(MAX_QUEUED)) + b"last"


class _Broken:
    def update(self, data: bytes, /) -> None:
        raise ValueError("disk on fire")

    def digest(self) -> bytes:
        return b""


def test_an_error_while_hashing_reaches_the_caller() -> None:
    h = BackgroundHasher(_Broken())
    h.update(b"x")
    with pytest.raises(ValueError, match="disk on fire"):
        h.digest()
    with pytest.raises(ValueError, match="disk on fire"):
        h.update(b"y")


def test_the_hashing_pool_is_made_once() -> None:
    assert hashing._pool() is hashing._pool()


# --- the envelope with its hashes beside the cipher --------------------------------------------


def _seal_l2(
    alice: User, bob: User, body: bytes, rng: SeededRandom, hashers: HasherFactory, **kw: bool
) -> tuple[SealedInner, bytes]:
    l2 = io.BytesIO()
    inner = seal_inner(
        sender=alice.sender(0),
        targets=bob.targets(),
        recipient_uiks=[bob.uik_pk],
        body=body,
        created_at=NOW,
        expires_at=NOW + DAY,
        sink=l2,
        rng=rng,
        hashers=hashers,
        **kw,
    )
    return inner, l2.getvalue()


def _seal(
    alice: User, bob: User, body: bytes, seed: bytes, hashers: HasherFactory
) -> tuple[bytes, bytes]:
    """(L2, L1) sealed from a seeded random source, so two seals can be compared byte for byte."""
    rng = SeededRandom(seed)
    inner, l2 = _seal_l2(alice, bob, body, rng, hashers)
    l1 = io.BytesIO()
    seal_outer(
        io.BytesIO(l2),
        inner.length,
        sek_id=bob.binding.sek_id,
        sek_pk=bob.binding.sek_pk,
        mailbox_id=bob.mailbox_id,
        not_after=NOW + DAY,
        sink=l1,
        token=bytes(32),
        rng=rng,
    )
    return l2, l1.getvalue()


@pytest.mark.parametrize("size", [0, 1000, BACKGROUND_MIN, 3 * BACKGROUND_MIN + 12_345])
def test_an_envelope_is_the_same_byte_for_byte_whoever_hashes(size: int) -> None:
    _, alice, bob, _ = world(b"hash-beside")
    body = bytes(i % 251 for i in range(size))
    in_line = _seal(alice, bob, body, b"seal", hasher)
    beside = _seal(alice, bob, body, b"seal", hasher_in_background)
    assert in_line == beside
    l2, l1 = beside

    def server_key(sek_id: int) -> bytes | None:
        key = bob.server.by_id(sek_id)
        return key.secret if key else None

    for hashers in (hasher, hasher_in_background):
        out = io.BytesIO()
        meta = open_outer(
            io.BytesIO(l1),
            len(l1),
            server_key=server_key,
            now=NOW,
            max_l2_bytes=MAX_L2,
            l2_sink=out,
            hashers=hashers,
        )
        assert out.getvalue() == l2
        assert meta.l2_digest == hash32(l2)
        plain = io.BytesIO()
        opened = open_inner(
            io.BytesIO(l2),
            len(l2),
            prekeys=bob.prekeys(1),
            reader_uik=bob.uik_pk,
            now=NOW,
            seen=NeverSeen(),
            sink=plain,
            hashers=hashers,
        )
        assert plain.getvalue() == body
        assert opened.body_hash == hash32(body)


def test_a_large_body_that_does_not_match_its_signed_hash_is_refused() -> None:
    rng, alice, bob, _ = world(b"hash-forged")
    body = b"a" * (2 * BACKGROUND_MIN)
    # validly signed, over the hash of another body
    l2 = forged_message(alice, bob, body, rng, body_hash=hash32(b"b" * len(body)))
    with pytest.raises(PayloadTampered, match="does not match the hash"):
        open_inner(
            io.BytesIO(l2),
            len(l2),
            prekeys=bob.prekeys(0),
            reader_uik=bob.uik_pk,
            now=NOW,
            seen=NeverSeen(),
            sink=io.BytesIO(),
            hashers=hasher_in_background,
        )


def test_without_a_thread_to_hash_in_the_hash_is_taken_in_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class _Closed:
        def submit(self, fn: object) -> None:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(hashing, "_pool", _Closed)
    h = BackgroundHasher(hashlib.blake2b(digest_size=32))
    h.update(b"late")
    h.update(b" piece")
    assert h.digest() == hash32(b"late piece")


@pytest.mark.parametrize("size", [10, BACKGROUND_MIN + 1])
def test_sealing_without_the_digest_writes_the_same_l2_whose_digest_comes_later(
    size: int,
) -> None:
    _, alice, bob, _ = world(b"digest-later")
    body = bytes(i % 13 for i in range(size))
    with_it, l2_a = _seal_l2(alice, bob, body, SeededRandom(b"same"), hasher_in_background)
    without, l2_b = _seal_l2(
        alice, bob, body, SeededRandom(b"same"), hasher_in_background, with_digest=False
    )
    assert l2_a == l2_b
    assert without.digest is None and with_it.digest == hash32(l2_a)
    for hashers in (hasher, hasher_in_background):
        assert l2_digest(io.BytesIO(l2_b), len(l2_b), hashers) == with_it.digest
