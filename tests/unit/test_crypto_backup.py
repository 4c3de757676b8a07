"""The backup container: round trips, and every kind of damage is named."""

from __future__ import annotations

import io

import pytest

from onionpost.core.crypto import backup
from onionpost.core.crypto.primitives import SeededRandom
from onionpost.core.errors import MalformedData, WrongPassphrase

PASS = "correct horse battery"


def sealed(data: bytes) -> bytes:
    out = io.BytesIO()
    backup.seal(io.BytesIO(data), out, PASS, rng=SeededRandom(b"backup"))
    return out.getvalue()


@pytest.mark.parametrize("size", [0, 1, backup.CHUNK - 1, backup.CHUNK, 3 * backup.CHUNK + 5])
def test_round_trip(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    out = io.BytesIO()
    assert backup.open_(io.BytesIO(sealed(data)), out, PASS) == size
    assert out.getvalue() == data


def test_wrong_passphrase_truncation_and_tampering_are_told_apart() -> None:
    blob = sealed(b"k" * (2 * backup.CHUNK + 10))
    with pytest.raises(WrongPassphrase):
        backup.open_(io.BytesIO(blob), io.BytesIO(), "not the passphrase")
    with pytest.raises(MalformedData, match="truncated"):
        backup.open_(io.BytesIO(blob[: len(blob) - 30]), io.BytesIO(), PASS)
    cut_after_first_chunk = 53 + 4 + backup.CHUNK + 17
    with pytest.raises(MalformedData, match="truncated"):
        backup.open_(io.BytesIO(blob[:cut_after_first_chunk]), io.BytesIO(), PASS)
    tampered = bytearray(blob)
    tampered[-5] ^= 1
    with pytest.raises(MalformedData, match="damaged"):
        backup.open_(io.BytesIO(bytes(tampered)), io.BytesIO(), PASS)
    with pytest.raises(MalformedData, match="after its end"):
        backup.open_(io.BytesIO(blob + b"\0"), io.BytesIO(), PASS)
    with pytest.raises(MalformedData, match="not an onionpost backup"):
        backup.open_(io.BytesIO(b"PK\x03\x04" + bytes(60)), io.BytesIO(), PASS)


def test_a_short_passphrase_is_refused() -> None:
    with pytest.raises(WrongPassphrase, match="at least 8"):
        backup.seal(io.BytesIO(b""), io.BytesIO(), "short")
