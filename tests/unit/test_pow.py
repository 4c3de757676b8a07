"""Proof-of-work stamps: bound to mailbox, day, message and difficulty."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionpost.core.crypto import pow as pw
from onionpost.core.crypto.pow import DAY, Stamp, day_of, leading_zero_bits, mint, verify
from onionpost.core.errors import ProofOfWorkError

MAILBOX = bytes(range(16))
MSG = bytes(range(32, 64))
NOW = 1_700_000_000
BITS = 10


@pytest.fixture(scope="module")
def stamp() -> Stamp:
    return mint(MAILBOX, MSG, BITS, NOW)


def _hash(mailbox: bytes, day: int, msg: bytes, bits: int, nonce: int) -> bytes:
    """The stamp hash written out from the module docstring, independently of the code."""
    data = (
        b"onionpost/v1/pow\x00"
        + mailbox
        + day.to_bytes(4, "big")
        + msg
        + bytes([bits])
        + nonce.to_bytes(8, "big")
    )
    return hashlib.blake2b(data, digest_size=32).digest()


def test_mint_then_verify(stamp: Stamp) -> None:
    assert stamp.bits == BITS
    assert stamp.day == day_of(NOW)
    verify(stamp, MAILBOX, MSG, BITS, NOW)
    verify(stamp, MAILBOX, MSG, BITS - 3, NOW)  # more work than asked for is fine
    assert leading_zero_bits(_hash(MAILBOX, stamp.day, MSG, BITS, stamp.nonce)) >= BITS


def test_mint_finds_the_first_nonce(stamp: Stamp) -> None:
    for nonce in range(stamp.nonce):
        assert leading_zero_bits(_hash(MAILBOX, stamp.day, MSG, BITS, nonce)) < BITS
    assert mint(MAILBOX, MSG, BITS, NOW, start=stamp.nonce) == stamp
    later = mint(MAILBOX, MSG, BITS, NOW, start=stamp.nonce + 1)
    assert later.nonce > stamp.nonce


@pytest.mark.parametrize(
    "what",
    ["mailbox", "message", "day", "nonce", "claimed bits", "required bits"],
)
def test_wrong_binding(stamp: Stamp, what: str) -> None:
    mailbox, msg, required, s = MAILBOX, MSG, BITS, stamp
    if what == "mailbox":
        mailbox = bytes(16)
    elif what == "message":
        msg = bytes(32)
    elif what == "day":
        s = Stamp(stamp.bits, stamp.day + 1, stamp.nonce)
    elif what == "nonce":
        s = Stamp(stamp.bits, stamp.day, stamp.nonce + 1)
    elif what == "claimed bits":
        s = Stamp(stamp.bits + 12, stamp.day, stamp.nonce)  # bits are inside the hash
    elif what == "required bits":
        required = BITS + 1
    # The chance that a changed input still happens to meet 10 bits is 2**-10; these inputs
    # are fixed, and checked to fail.
    with pytest.raises(ProofOfWorkError):
        verify(s, mailbox, msg, required, NOW)


def test_day_window(stamp: Stamp) -> None:
    day_start = day_of(NOW) * DAY
    verify(stamp, MAILBOX, MSG, BITS, day_start - DAY)  # made "tomorrow" by a fast clock
    verify(stamp, MAILBOX, MSG, BITS, day_start + 2 * DAY - 1)  # made yesterday
    with pytest.raises(ProofOfWorkError, match="another day"):
        verify(stamp, MAILBOX, MSG, BITS, day_start + 2 * DAY)
    with pytest.raises(ProofOfWorkError, match="another day"):
        verify(stamp, MAILBOX, MSG, BITS, day_start - DAY - 1)


def test_ranges() -> None:
    with pytest.raises(ProofOfWorkError):
        mint(MAILBOX, MSG, pw.MAX_BITS + 1, NOW)
    with pytest.raises(ProofOfWorkError):
        mint(MAILBOX, MSG, -1, NOW)
    with pytest.raises(ProofOfWorkError):
        verify(Stamp(pw.MAX_BITS + 1, day_of(NOW), 0), MAILBOX, MSG, 0, NOW)
    with pytest.raises(ProofOfWorkError):
        verify(Stamp(0, day_of(NOW), 1 << 64), MAILBOX, MSG, 0, NOW)
    with pytest.raises(ProofOfWorkError):
        verify(Stamp(0, day_of(NOW), -1), MAILBOX, MSG, 0, NOW)
    verify(mint(MAILBOX, MSG, 0, NOW), MAILBOX, MSG, 0, NOW)


@settings(max_examples=30, deadline=None)
@given(
    mailbox=st.binary(min_size=16, max_size=16),
    msg=st.binary(min_size=32, max_size=32),
    bits=st.integers(0, 8),
)
def test_mint_verify_property(mailbox: bytes, msg: bytes, bits: int) -> None:
    s = mint(mailbox, msg, bits, NOW)
    verify(s, mailbox, msg, bits, NOW)
    assert leading_zero_bits(_hash(mailbox, s.day, msg, bits, s.nonce)) >= bits


def test_leading_zero_bits() -> None:
    assert leading_zero_bits(bytes(32)) == 256
    assert leading_zero_bits(b"\x80" + bytes(31)) == 0
    assert leading_zero_bits(b"\x00\x01" + bytes(30)) == 15
