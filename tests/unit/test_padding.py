"""Envelope sizes: the 16 KiB floor, Padmé above it, and L1 lengths that match exactly."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionpost.core.crypto import envelope as env
from onionpost.core.crypto.padding import FLOOR, bucket, padme
from onionpost.core.crypto.primitives import STREAM_ABYTES, SeededRandom, x25519_public

MiB = 1 << 20


def _buckets(upto: int) -> list[int]:
    """Every Padmé bucket from the floor up to ``upto``."""
    out = []
    n = FLOOR
    while n <= upto:
        b = padme(n)
        out.append(b)
        n = b + 1
    return out


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 1 << 34), st.integers(0, 1 << 34))
def test_padme_is_monotone(a: int, b: int) -> None:
    lo, hi = sorted((a, b))
    assert padme(lo) <= padme(hi)
    assert bucket(lo) <= bucket(hi)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 1 << 34))
def test_padme_bounds_and_idempotence(n: int) -> None:
    p = padme(n)
    assert p >= n
    assert padme(p) == p
    assert bucket(bucket(n)) == bucket(n)
    assert bucket(n) >= FLOOR
    if n >= FLOOR:
        assert p - n <= 0.12 * n
        assert bucket(n) == p


def test_padme_known_values() -> None:
    # worked by hand from the definition: L = 100 000 -> E = 16, S = 5, keep 11 low bits zero
    assert padme(100_000) == 100_352
    assert padme(1_000_000) == 1_015_808
    assert [padme(n) for n in range(0, 10)] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]
    assert bucket(0) == bucket(1) == bucket(FLOOR) == FLOOR
    assert bucket(FLOOR + 1) == FLOOR + 1024


def test_padme_leaks_few_bits() -> None:
    """Between 1 MiB and 2 MiB (E = 20, S = 5) sizes are multiples of 2**15: 32 of them."""
    assert len([b for b in _buckets(2 * MiB) if MiB <= b < 2 * MiB]) == 32


def test_every_bucket_up_to_1_gib_is_reachable() -> None:
    """``_solve_padding`` moves to the next reachable size when a total cannot be written as
    L1 header + secretstream (a last chunk of 1..16 bytes cannot exist).  With today's
    182-byte L1 header no bucket up to 1 GiB hits that case, so every L1 is a bucket."""
    for b in _buckets(1 << 30):
        room = b - env.L1_HEADER
        assert not 1 <= room % env.SEALED_CHUNK <= 16, b


chunk_edges = st.sampled_from(
    [
        k * env.CHUNK + d
        for k in range(0, 24)
        for d in (-STREAM_ABYTES - 1, -STREAM_ABYTES, -2, -1, 0, 1, 2, 17)
        if k * env.CHUNK + d >= 0
    ]
    + [
        b - env.L1_HEADER - STREAM_ABYTES * k - d
        for b in _buckets(2 * MiB)
        for k in (1, 2)
        for d in (-1, 0, 1)
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.integers(0, 200_000), chunk_edges, st.integers(0, 1 << 30)))
def test_solve_padding_arithmetic(l2_len: int) -> None:
    total, plain = env._solve_padding(l2_len)
    assert plain >= l2_len
    assert total == env.L1_HEADER + env.stream_length(plain)
    assert total == env.outer_length(l2_len)
    assert total == bucket(env.L1_HEADER + env.stream_length(l2_len))


def _sealed_length(l2_len: int) -> int:
    rng = SeededRandom(l2_len.to_bytes(8, "big"))
    sink = io.BytesIO()
    n = env.seal_outer(
        io.BytesIO(bytes(l2_len)),
        l2_len,
        sek_id=1,
        sek_pk=x25519_public(rng(32)),
        mailbox_id=bytes(16),
        not_after=0,
        sink=sink,
        rng=rng,
    )
    assert n == len(sink.getvalue())
    return n


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(0, 200_000), chunk_edges.filter(lambda n: n < 1_600_000)))
def test_outer_length_is_what_seal_outer_writes(l2_len: int) -> None:
    assert _sealed_length(l2_len) == env.outer_length(l2_len)


@pytest.mark.parametrize("l2_len", [0, 1, 824, FLOOR - env.L1_HEADER - 17, FLOOR])
def test_short_messages_travel_as_16_kib(l2_len: int) -> None:
    expected = FLOOR if l2_len <= FLOOR - env.L1_HEADER - 17 else bucket(FLOOR + 1)
    assert _sealed_length(l2_len) == expected
