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
from onionpost.core.crypto.envelope import HasherFactory, l2_digest
from onionpost.core.crypto.primitives import hash32, hasher
from onionpost.core.errors import PayloadTampered
from tests.unit.crypto_world import forged_message, open_l1, open_l2, seal_l1, seal_l2, world


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


def _sealed(body: bytes, hashers: HasherFactory) -> tuple[bytes, bytes]:
    """(L2, L1) from a seeded random source, so two seals can be compared byte for byte."""
    rng, alice, bob, _ = world(b"hash-beside")
    l2, _ = seal_l2(alice, [bob], body, rng, hashers=hashers)
    return l2, seal_l1(l2, bob, rng)


@pytest.mark.parametrize("size", [0, 1000, BACKGROUND_MIN, 3 * BACKGROUND_MIN + 12_345])
def test_an_envelope_is_the_same_byte_for_byte_whoever_hashes(size: int) -> None:
    body = bytes(i % 251 for i in range(size))
    in_line = _sealed(body, hasher)
    beside = _sealed(body, hasher_in_background)
    assert in_line == beside
    l2, l1 = beside
    _, _, bob, _ = world(b"hash-beside")
    for hashers in (hasher, hasher_in_background):
        meta, opened_l2 = open_l1(l1, bob, hashers=hashers)
        assert opened_l2 == l2
        assert meta.l2_digest == hash32(l2)
        opened, plain = open_l2(l2, bob, 1, hashers=hashers)
        assert plain == body
        assert opened.body_hash == hash32(body)


def test_a_large_body_that_does_not_match_its_signed_hash_is_refused() -> None:
    rng, alice, bob, _ = world(b"hash-forged")
    body = b"a" * (2 * BACKGROUND_MIN)
    # validly signed, over the hash of another body
    l2 = forged_message(alice, bob, body, rng, body_hash=hash32(b"b" * len(body)))
    with pytest.raises(PayloadTampered, match="does not match the hash"):
        open_l2(l2, bob, 0, hashers=hasher_in_background)


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
    body = bytes(i % 13 for i in range(size))
    rng_a, alice, bob, _ = world(b"digest-later")
    rng_b = world(b"digest-later")[0]
    l2_a, with_it = seal_l2(alice, [bob], body, rng_a, hashers=hasher_in_background)
    l2_b, without = seal_l2(
        alice, [bob], body, rng_b, hashers=hasher_in_background, with_digest=False
    )
    assert l2_a == l2_b
    assert without.digest is None and with_it.digest == hash32(l2_a)
    for hashers in (hasher, hasher_in_background):
        assert l2_digest(io.BytesIO(l2_b), len(l2_b), hashers) == with_it.digest
