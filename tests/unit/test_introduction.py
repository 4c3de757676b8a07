"""The introduction record (protocol §16): encoding, signature, bindings, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionpost.core.crypto.introduction import (
    MAX_BYTES,
    MAX_LIFETIME,
    Introduction,
    introduction_pair,
    open_introduction,
)
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import BadSignature, MalformedData, MessageExpired, OnionpostError

NOW = 1_700_000_000
RNG = SeededRandom(b"introduction unit tests")
A_UIK, B_UIK, C_UIK = RNG(32), RNG(32), RNG(32)
B_ONION, C_ONION = RNG(32), RNG(32)
DSK_SEED = RNG(32)
DSK_PK = ed25519_public(DSK_SEED)
T_B, T_C = RNG(32), RNG(32)


def pair() -> tuple[Introduction, Introduction]:
    return introduction_pair(
        introducer_uik=A_UIK,
        b=("bob", B_ONION, B_UIK),
        c=("carol", C_ONION, C_UIK),
        token_b=T_B,
        token_c=T_C,
        created_at=NOW,
        expires_at=NOW + 86_400,
        dsk_seed=DSK_SEED,
    )


def test_a_pair_names_the_other_and_crosses_the_tokens() -> None:
    for_b, for_c = pair()
    assert (for_b.recipient_uik, for_b.local, for_b.onion_pk, for_b.uik_pk) == (
        B_UIK,
        "carol",
        C_ONION,
        C_UIK,
    )
    assert (for_c.recipient_uik, for_c.local, for_c.uik_pk) == (C_UIK, "bob", B_UIK)
    # B registers T_B (C presents it at B's inbox) and presents T_C; C the other way round
    assert (for_b.admit_token, for_b.present_token) == (T_B, T_C)
    assert (for_c.admit_token, for_c.present_token) == (T_C, T_B)


def test_round_trip_and_open() -> None:
    for_b, _ = pair()
    data = for_b.encode()
    assert len(data) == 4 + 32 + 32 + 1 + len("carol") + 32 * 4 + 8 + 8 + 64
    assert Introduction.parse(data) == for_b
    opened = open_introduction(data, dsk_pk=DSK_PK, sender_uik=A_UIK, reader_uik=B_UIK, now=NOW)
    assert opened == for_b


def test_every_byte_is_signed() -> None:
    data = pair()[0].encode()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(OnionpostError):
            open_introduction(
                bytes(bad), dsk_pk=DSK_PK, sender_uik=A_UIK, reader_uik=B_UIK, now=NOW
            )


def test_another_key_did_not_sign_it() -> None:
    data = pair()[0].encode()
    with pytest.raises(BadSignature):
        open_introduction(
            data, dsk_pk=ed25519_public(RNG(32)), sender_uik=A_UIK, reader_uik=B_UIK, now=NOW
        )


def test_bound_to_introducer_and_recipient() -> None:
    for_b, _ = pair()
    # passed on to someone else: carol cannot use bob's record (nor anyone else)
    with pytest.raises(MalformedData, match="someone else"):
        open_introduction(
            for_b.encode(), dsk_pk=DSK_PK, sender_uik=A_UIK, reader_uik=C_UIK, now=NOW
        )
    # a sender whose device key signed it but who names another introducer
    with pytest.raises(MalformedData, match="introducer"):
        open_introduction(
            for_b.encode(), dsk_pk=DSK_PK, sender_uik=C_UIK, reader_uik=B_UIK, now=NOW
        )


def test_expiry() -> None:
    data = pair()[0].encode()
    open_introduction(data, dsk_pk=DSK_PK, sender_uik=A_UIK, reader_uik=B_UIK, now=NOW + 86_400)
    with pytest.raises(MessageExpired):
        open_introduction(data, dsk_pk=DSK_PK, sender_uik=A_UIK, reader_uik=B_UIK, now=NOW + 86_401)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"expires_at": NOW - 1}, "lifetime"),
        ({"expires_at": NOW + MAX_LIFETIME + 1}, "lifetime"),
        ({"present_token": T_B}, "same"),
        ({"uik_pk": B_UIK}, "same person"),
        ({"uik_pk": A_UIK}, "same person"),
        ({"local": ""}, "name"),
        ({"local": "x" * 65}, "name"),
    ],
)
def test_what_no_honest_introducer_signs(change: dict[str, object], words: str) -> None:
    base = Introduction(A_UIK, B_UIK, "carol", C_ONION, C_UIK, T_B, T_C, NOW, NOW + 60)
    bad = base.__class__(**{**base.__dict__, **change})
    with pytest.raises(MalformedData, match=words):
        bad.signed(DSK_SEED)


@pytest.mark.parametrize("local", [b"car ol", b"carol@x", b"<carol>", b"caf\xc3\xa9", b"a\x00"])
def test_hostile_names_are_refused(local: bytes) -> None:
    good = pair()[0].encode()
    start = 4 + 32 + 32
    n = good[start]
    data = good[:start] + bytes([len(local)]) + local + good[start + 1 + n :]
    with pytest.raises(MalformedData):
        Introduction.parse(data)


def test_lengths_are_bounded() -> None:
    good = pair()[0].encode()
    with pytest.raises(MalformedData):
        Introduction.parse(good + b"\x00")  # trailing bytes
    with pytest.raises(MalformedData):
        Introduction.parse(good[:-1])  # cut
    with pytest.raises(MalformedData, match="too long"):
        Introduction.parse(good + bytes(MAX_BYTES))  # refused before anything is read
    with pytest.raises(MalformedData):
        Introduction.parse(b"OPc1" + good[4:])  # another record's magic
    # a name length past the end
    start = 4 + 32 + 32
    with pytest.raises(MalformedData):
        Introduction.parse(good[:start] + b"\xff" + good[start + 1 :])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=MAX_BYTES + 8))
def test_random_bytes_fail_cleanly(data: bytes) -> None:
    with pytest.raises(OnionpostError):
        open_introduction(data, dsk_pk=DSK_PK, sender_uik=A_UIK, reader_uik=B_UIK, now=NOW)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutations_of_a_valid_record_fail_cleanly(data: st.DataObject) -> None:
    good = bytearray(pair()[0].encode())
    pos = data.draw(st.integers(0, len(good) - 1))
    how = data.draw(st.sampled_from(["set", "cut", "insert", "delete"]))
    if how == "set":
        good[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != good[pos]))
    elif how == "cut":
        del good[pos:]
    elif how == "insert":
        good.insert(pos, data.draw(st.integers(0, 255)))
    else:
        del good[pos]
    with pytest.raises(OnionpostError):
        open_introduction(bytes(good), dsk_pk=DSK_PK, sender_uik=A_UIK, reader_uik=B_UIK, now=NOW)
