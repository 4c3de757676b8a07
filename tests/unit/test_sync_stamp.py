"""What sync adds to a verified message before filing it, and what it refuses to keep."""

from __future__ import annotations

import tempfile
from email import message_from_bytes
from email.policy import default

import pytest

from onionpost.core.address import Address
from onionpost.core.crypto.primitives import ed25519_public
from onionpost.core.normalize import HEADER_BLOCK_LIMIT, WHOLE_MESSAGE_LIMIT, normalize
from onionpost.device.sync import _filed_form, _Sender, _stamp

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


# -- what is filed: the whole message normalised, or a large one's header and its body -----


def _filed(message: bytes, now: int = 1_700_000_000) -> bytes:
    """What ``_filed_form`` makes the filing queue write for ``message``."""
    with tempfile.TemporaryFile() as body:
        body.write(message)
        head, offset = _filed_form(body, SENDER, now)
        if offset is None:
            return head
        body.seek(offset)
        return head + body.read()


def _large_body(eol: bytes) -> bytes:
    line = b"QUJD" * 19 + eol  # a base64 line
    return line * (WHOLE_MESSAGE_LIMIT // len(line) + 10)


def test_a_small_message_is_normalised_whole() -> None:
    raw = b"Subject: caf\xc3\xa9\nFrom: x@y.example\n\nbody\n"
    assert _filed(raw) == normalize(_stamp(raw, SENDER), now=1_700_000_000)


@pytest.mark.parametrize("eol", [b"\r\n", b"\n"])
def test_a_large_message_keeps_its_body_byte_for_byte_and_gets_its_header_repaired(
    eol: bytes,
) -> None:
    body = _large_body(eol)
    head = eol.join(
        [
            b"X-Onionpost-Verified: mallory@evil (identity 0000)",
            b"From: The Bank <security@bank.example>",
            b"Subject: caf\xc3\xa9",  # raw 8-bit: repaired (RFC 2047)
            b"Date: Mon, 1 Jan 2024 00:00:00 +0000",
            b"Message-ID: <large@example>",
            b"",
            b"",
        ]
    )
    filed = _filed(head + body)
    filed_head, sep, filed_body = filed.partition(b"\r\n\r\n")
    assert sep and filed_body == body  # the body exactly as sent, line ends included
    assert filed_head.isascii()
    msg = message_from_bytes(filed_head + b"\r\n\r\n", policy=default)
    assert msg.get_all("X-Onionpost-Verified") == [msg["X-Onionpost-Verified"]]
    assert msg["X-Onionpost-Verified"].startswith(str(ALICE))
    assert msg["From"].addresses[0].addr_spec == str(ALICE)
    assert "security@bank.example" in msg["X-Original-From"]
    assert msg["Subject"] == "café"
    assert msg["Message-ID"] == "<large@example>"


def test_a_large_message_without_date_or_message_id_gets_both() -> None:
    raw = b"Subject: big\r\n\r\n" + _large_body(b"\r\n")
    first = message_from_bytes(_filed(raw).partition(b"\r\n\r\n")[0], policy=default)
    again = message_from_bytes(_filed(raw).partition(b"\r\n\r\n")[0], policy=default)
    assert first["Date"] is not None
    assert first["Message-ID"].endswith("@onionpost.invalid>")
    assert first["Message-ID"] == again["Message-ID"]  # named by the message's digest


def test_a_large_message_whose_header_does_not_end_within_the_bound_is_an_attachment() -> None:
    raw = b"Subject: never ends\r\n" + b"X-Filler: " + b"a" * 70 + b"\r\n"
    raw = raw * (HEADER_BLOCK_LIMIT // 80 + 10) + b"\r\n" + _large_body(b"\r\n")
    filed = _filed(raw)
    head, _, rest = filed.partition(b"\r\n\r\n")
    assert rest == raw  # the whole original, as the attachment
    msg = message_from_bytes(head + b"\r\n\r\n", policy=default)
    assert msg["Subject"] == "Message with an oversized header"
    assert msg["From"].addresses[0].addr_spec == str(ALICE)
    assert msg["X-Onionpost-Verified"].startswith(str(ALICE))
    assert msg.get_content_type() == "application/octet-stream"
    assert msg.get_filename() == "original.eml"


def test_held_mail_carries_the_key_change_warning_instead_of_verified() -> None:
    raw = b"X-Onionpost-Key-Change: forged\r\nFrom: <" + str(ALICE).encode() + b">\r\n\r\nhi"
    held = _Sender(ALICE, b"\x02" * 32, warning="HELD: signed by a NEW identity key")
    msg = message_from_bytes(_stamp(raw, held), policy=default)
    assert msg.get_all("X-Onionpost-Key-Change") == ["HELD: signed by a NEW identity key"]
    assert msg["X-Onionpost-Verified"] is None
