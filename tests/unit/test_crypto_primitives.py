"""The thin libsodium layer: deterministic randomness, KDF, and the secretstream trick."""

from __future__ import annotations

import nacl.bindings as sodium
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionpost.core.crypto import primitives as p
from onionpost.core.errors import BadSignature, CryptoError, MalformedData


def test_seeded_random_is_a_stream() -> None:
    a = p.SeededRandom(b"seed")
    b = p.SeededRandom(b"seed")
    assert a(10) + a(100) + a(1) == b(111)
    assert p.SeededRandom(b"seed")(32) != p.SeededRandom(b"seee")(32)
    assert a(0) == b""


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=10))
def test_seeded_random_any_split(sizes: list[int]) -> None:
    r = p.SeededRandom(b"split")
    assert b"".join(r(n) for n in sizes) == p.SeededRandom(b"split")(sum(sizes))


def test_kdf_separates_label_and_salt() -> None:
    k = bytes(32)
    assert p.kdf(k, b"ab", b"c") != p.kdf(k, b"a", b"bc")
    assert p.kdf(k, b"a") != p.kdf(bytes(31) + b"\x01", b"a")
    assert len(p.kdf(k, b"x")) == 32
    with pytest.raises(CryptoError):
        p.kdf(b"", b"x")
    with pytest.raises(CryptoError):
        p.kdf(bytes(65), b"x")


def test_kdf_definition() -> None:
    import hashlib

    key, label, salt = b"k" * 32, b"onionpost/v1/stanza", b"s" * 64
    expected = hashlib.blake2b(
        len(label).to_bytes(2, "big") + label + salt, key=key, digest_size=32
    ).digest()
    assert p.kdf(key, label, salt) == expected


def test_stream_sealer_output_is_standard_secretstream() -> None:
    """Our push state comes from init_pull on an rng-drawn header; plain libsodium pull must
    read it exactly as if init_push had drawn that header."""
    key = p.SeededRandom(b"k")(32)
    header = p.SeededRandom(b"h")(24)
    sealer = p.StreamSealer(key, header)
    chunks = [sealer.seal(b"one", final=False), sealer.seal(b"two", final=True)]
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    out = [sodium.crypto_secretstream_xchacha20poly1305_pull(state, c, None) for c in chunks]
    assert out == [(b"one", p.TAG_MESSAGE), (b"two", p.TAG_FINAL)]
    # and the same key and header always give the same bytes
    again = p.StreamSealer(key, header)
    assert again.seal(b"one", final=False) == chunks[0]


def test_stream_opener_rejects() -> None:
    key, header = bytes(32), bytes(24)
    with pytest.raises(MalformedData):
        p.StreamOpener(key, header[:23])
    with pytest.raises(CryptoError):
        p.StreamSealer(key, header[:23])
    opener = p.StreamOpener(key, header)
    assert opener.open(b"") is None
    assert opener.open(bytes(16)) is None
    assert opener.open(bytes(100)) is None


def test_stream_opener_refuses_push_and_rekey_tags() -> None:
    key, header = bytes(32), bytes(24)
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    chunk = sodium.crypto_secretstream_xchacha20poly1305_push(
        state, b"x", None, sodium.crypto_secretstream_xchacha20poly1305_TAG_PUSH
    )
    assert p.StreamOpener(key, header).open(chunk) is None


def test_x25519_refuses_low_order_and_bad_lengths() -> None:
    secret = p.SeededRandom(b"x")(32)
    with pytest.raises(CryptoError):
        p.x25519(secret, bytes(32))
    with pytest.raises(CryptoError):
        p.x25519(secret, (1).to_bytes(32, "little"))
    with pytest.raises(MalformedData):
        p.x25519(secret, bytes(31))
    a, b = p.SeededRandom(b"a")(32), p.SeededRandom(b"b")(32)
    assert p.x25519(a, p.x25519_public(b)) == p.x25519(b, p.x25519_public(a))


def test_ed25519() -> None:
    seed = p.SeededRandom(b"ed")(32)
    pk = p.ed25519_public(seed)
    sig = p.ed25519_sign(seed, b"msg")
    p.ed25519_verify(pk, b"msg", sig, "test")
    with pytest.raises(BadSignature, match="test"):
        p.ed25519_verify(pk, b"msh", sig, "test")
    with pytest.raises(BadSignature):
        p.ed25519_verify(pk[:31], b"msg", sig, "test")
    with pytest.raises(BadSignature):
        p.ed25519_verify(pk, b"msg", sig[:63], "test")
    with pytest.raises(BadSignature):
        p.ed25519_verify(bytes(32), b"msg", sig, "test")


def test_aead() -> None:
    key, nonce = bytes(32), bytes(24)
    ct = p.aead_encrypt(key, nonce, b"pt", b"ad")
    assert p.aead_decrypt(key, nonce, ct, b"ad") == b"pt"
    assert p.aead_decrypt(key, nonce, ct, b"ae") is None
    assert p.aead_decrypt(key, nonce, ct[:-1], b"ad") is None
    assert p.aead_decrypt(key, nonce, b"", b"ad") is None


def test_constant_time_equal() -> None:
    assert p.constant_time_equal(b"abc", b"abc")
    assert not p.constant_time_equal(b"abc", b"abd")
    assert not p.constant_time_equal(b"abc", b"ab")


def test_valid_point() -> None:
    assert p.ed25519_is_valid_point(p.ed25519_public(bytes(32)))
    assert not p.ed25519_is_valid_point(bytes(32))
    assert not p.ed25519_is_valid_point(b"\x01")
