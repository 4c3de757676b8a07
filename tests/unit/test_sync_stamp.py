"""What sync adds to a verified message before filing it, and what it refuses to keep."""

from __future__ import annotations

from email import message_from_bytes
from email.policy import default

import pytest

from onionpost.address import Address
from onionpost.crypto.primitives import ed25519_public
from onionpost.sync import _Sender, _stamp

ALICE = Address.for_key("alice", ed25519_public(b"\x01" * 32))
SENDER = _Sender(ALICE, b"\x02" * 32)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_forged_verification_headers_are_dropped(eol: bytes) -> None:
    raw = eol.join(
        [
            b"X-Onionpost-Verified: mallory@evil (identity 0000)",
            b"x-onionpost-notice: verification-failed",
            f"From: Alice <{ALICE}>".encode(),
            b"Subject: hi",
            b"",
            b"body X-Onionpost-Verified: stays in the body",
        ]
    )
    out = _stamp(raw, SENDER)
    msg = message_from_bytes(out, policy=default)
    assert msg.get_all("X-Onionpost-Verified") == [msg["X-Onionpost-Verified"]]
    assert msg["X-Onionpost-Verified"].startswith(str(ALICE))
    assert msg["X-Onionpost-Notice"] is None
    assert msg["X-Original-From"] is None  # From already told the truth
    assert b"stays in the body" in out


def test_a_from_header_naming_someone_else_is_rewritten() -> None:
    raw = b"From: The Bank <security@bank.example>\r\nSubject: urgent\r\n\r\nclick here\r\n"
    msg = message_from_bytes(_stamp(raw, SENDER), policy=default)
    assert msg["From"].addresses[0].addr_spec == str(ALICE)
    assert msg["From"].addresses[0].display_name == "The Bank"
    assert "security@bank.example" in msg["X-Original-From"]


def test_a_missing_from_header_is_added() -> None:
    msg = message_from_bytes(_stamp(b"Subject: x\r\n\r\nbody", SENDER), policy=default)
    assert msg["From"].addresses[0].addr_spec == str(ALICE)
