"""The envelope's fast paths give the same bytes and the same verdicts as the plain ones.

Each was added for speed (docs/performance.md, "Envelope crypto"): chunking without extra
copies, libsodium's BLAKE2b for long inputs, a memcmp padding check, one Ed25519 key
derivation per seal, batched random draws and public keys supplied by the caller.
"""

from __future__ import annotations

import hashlib
import io

import pytest

from onionpost.core.crypto import envelope as env
from onionpost.core.crypto.primitives import (
    SODIUM_HASH_MIN,
    SeededRandom,
    ed25519_keypair,
    ed25519_public,
    ed25519_sign,
    ed25519_sign_expanded,
    ed25519_verify,
    hasher,
)
from onionpost.core.errors import MalformedData, NotForThisInbox
from tests.unit import crypto_world as cw


@pytest.mark.parametrize(
    "lengths",
    [(), (0,), (5,), (env.CHUNK,), (3, env.CHUNK), (env.CHUNK, 0, 7), (100, 2 * env.CHUNK + 9, 1)],
)
@pytest.mark.parametrize("as_view", [False, True])
def test_segments_chunks_is_the_concatenation_cut_into_chunks(
    lengths: tuple[int, ...], as_view: bool
) -> None:
    rng = SeededRandom(b"chunks")
    segments = [rng(n) for n in lengths]
    data = b"".join(segments)
    pieces = list(
        env._segments_chunks([memoryview(s) if as_view else s for s in segments], env.CHUNK)
    )
    assert all(type(p) is bytes for p in pieces)
    assert b"".join(pieces) == data
    assert [len(p) for p in pieces[:-1]] == [env.CHUNK] * (len(pieces) - 1)
    assert len(pieces) == max(1, -(-len(data) // env.CHUNK))


@pytest.mark.parametrize("n", [0, 1, 1000, SODIUM_HASH_MIN - 1, SODIUM_HASH_MIN, 3 * 65536 + 5])
def test_hasher_is_blake2b_256_whatever_the_size(n: int) -> None:
    data = SeededRandom(b"hash")(n)
    h = hasher(n)
    for i in range(0, n, 7000):
        h.update(data[i : i + 7000])
    assert h.digest() == hashlib.blake2b(data, digest_size=32).digest()
    assert h.digest() == h.digest()


def test_padding_check_finds_any_nonzero_byte() -> None:
    plain = b"\x01" * 10 + bytes(env.CHUNK - 10)
    env._check_zeros(plain, 10)
    env._check_zeros(plain, len(plain))
    for pos in (10, 11, len(plain) // 2, len(plain) - 1):
        bad = bytearray(plain)
        bad[pos] = 0x80
        with pytest.raises(MalformedData):
            env._check_zeros(bytes(bad), 10)


def test_expanded_signing_key_signs_like_the_seed() -> None:
    seed = SeededRandom(b"ed")(32)
    public, secret = ed25519_keypair(seed)
    assert public == ed25519_public(seed)
    assert ed25519_sign_expanded(secret, b"m") == ed25519_sign(seed, b"m")
    ed25519_verify(public, b"m", ed25519_sign(seed, b"m"), "test")


def test_opening_with_supplied_public_keys_is_the_same() -> None:
    rng, alice, bob, _ = cw.world(b"fastpaths")
    l2, _ = cw.seal_l2(alice, [bob], b"Subject: x\r\n\r\nhello\r\n", rng)
    l1 = cw.seal_l1(l2, bob, rng)
    meta, opened_l2 = cw.open_l1(l1, bob)
    sek = bob.server.current()
    out = io.BytesIO()
    meta2 = env.open_outer(
        io.BytesIO(l1),
        len(l1),
        server_key=lambda _id: (sek.secret, sek.public),
        now=cw.NOW,
        max_l2_bytes=cw.MAX_L2,
        l2_sink=out,
    )
    assert (meta2, out.getvalue()) == (meta, opened_l2)
    with pytest.raises(NotForThisInbox):
        env.open_outer(
            io.BytesIO(l1),
            len(l1),
            server_key=lambda _id: (sek.secret, bytes(32)),  # a wrong public key
            now=cw.NOW,
            max_l2_bytes=cw.MAX_L2,
            l2_sink=io.BytesIO(),
        )
    triples = [(p.spk_id, p.secret, p.public) for p in bob.devices[0].prekeys]
    body = io.BytesIO()
    msg = env.open_inner(
        io.BytesIO(l2),
        len(l2),
        prekeys=triples,
        reader_uik=bob.uik_pk,
        now=cw.NOW,
        seen=cw.NeverSeen(),
        sink=body,
    )
    assert body.getvalue() == b"Subject: x\r\n\r\nhello\r\n"
    assert msg.msg_id == cw.open_l2(l2, bob, 0)[0].msg_id
