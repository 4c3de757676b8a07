"""Delivery status notifications (onionpost/core/dsn.py) read as RFC 3464 reports by a mail
parser."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from onionpost.core.dsn import MAX_HEADERS, RecipientStatus, build, device_change_notice

ONION = "a" * 56 + ".onion"
USER = f"alice@{ONION}"
HEADERS = b"From: alice\r\nTo: bob\r\nSubject: hello\r\nMessage-ID: <m1@x>\r\n\r\n"
ARRIVAL = 1_700_000_000
NOW = ARRIVAL + 3600

BOUNCED = RecipientStatus(f"bob@{ONION}", "failed", "5.1.1", "No such\r\nmailbox.", ARRIVAL + 60)
DELAYED = RecipientStatus(
    f"carol@{ONION}", "delayed", "4.4.1", "Offline.", ARRIVAL + 60, ARRIVAL + 5 * 86_400
)


def _notice(*recipients: RecipientStatus, headers: bytes = HEADERS) -> tuple[bytes, EmailMessage]:
    raw = build(
        user_address=USER,
        reporting_onion=ONION,
        original_headers=headers,
        arrival=ARRIVAL,
        now=NOW,
        recipients=recipients,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return raw, msg


# (recipients, subject, the sentence the person reads first)
SUBJECTS = [
    ((BOUNCED,), "Undelivered Mail Returned to Sender", "It will not try again."),
    ((DELAYED,), "Delayed Mail (still being retried)", "It keeps trying"),
    # one failure among delays makes it a bounce: the person must act
    ((DELAYED, BOUNCED), "Undelivered Mail Returned to Sender", "It will not try again."),
]


@pytest.mark.parametrize(("recipients", "subject", "sentence"), SUBJECTS)
def test_notice_is_a_delivery_report(
    recipients: tuple[RecipientStatus, ...], subject: str, sentence: str
) -> None:
    raw, msg = _notice(*recipients)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    assert msg["Subject"] == subject
    assert msg["To"] == USER
    assert msg["From"].addresses[0].addr_spec == f"postmaster@{ONION}"
    assert msg["Auto-Submitted"] == "auto-replied"  # no autoresponder answers it
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, original = msg.iter_parts()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert sentence in text
    for r in recipients:
        assert r.address in text and f"({r.status})" in text
    assert status.get_content_type() == "message/delivery-status"
    assert original.get_content_type() == "text/rfc822-headers"
    assert b"Subject: hello" in raw and b"Message-ID: <m1@x>" in raw


def test_status_blocks_per_recipient() -> None:
    raw, _ = _notice(DELAYED, BOUNCED)
    report = raw.split(b"message/delivery-status", 1)[1].split(b"text/rfc822-headers")[0]
    text = report.decode()
    assert f"Reporting-MTA: dns; {ONION}" in text
    assert f"Final-Recipient: rfc822; bob@{ONION}\r\nAction: failed\r\nStatus: 5.1.1" in text
    assert f"Final-Recipient: rfc822; carol@{ONION}\r\nAction: delayed\r\nStatus: 4.4.1" in text
    # diagnostics are folded onto one line, so they cannot inject header fields
    assert "Diagnostic-Code: X-Onionpost; No such mailbox.\r\n" in text
    assert text.count("Last-Attempt-Date:") == 2
    # only a delay says until when it is retried
    assert text.count("Will-Retry-Until:") == 1
    assert "Still trying until" in raw.decode()


def test_optional_dates_are_left_out() -> None:
    bare = RecipientStatus(f"bob@{ONION}", "failed", "5.0.0", "No.", None, ARRIVAL + 86_400)
    raw, _ = _notice(bare)
    assert b"Last-Attempt-Date" not in raw and b"Will-Retry-Until" not in raw


def test_same_input_same_notice_and_a_different_one_differs() -> None:
    a, _ = _notice(BOUNCED)
    b, _ = _notice(BOUNCED)
    c, _ = _notice(DELAYED)
    assert a == b
    assert a != c
    boundary = a.split(b'boundary="', 1)[1].split(b'"', 1)[0]
    assert boundary.startswith(b"onionpost-report-")


def test_headers_are_normalised_and_capped() -> None:
    bare_lf = b"Subject: lf only\nX-A: 1\n\n"
    raw, _ = _notice(BOUNCED, headers=bare_lf)
    assert b"Subject: lf only\r\nX-A: 1\r\n\r\n--" in raw
    huge = b"X-Big: " + b"x" * (2 * MAX_HEADERS)
    raw, _ = _notice(BOUNCED, headers=huge)
    assert len(raw) < MAX_HEADERS + 8192


def test_long_diagnostic_is_cut() -> None:
    long = RecipientStatus(f"bob@{ONION}", "failed", "5.0.0", "y" * 5000)
    raw, _ = _notice(long)
    assert b"X-Onionpost; " + b"y" * 900 + b"\r\n" in raw


# (added, revoked, subject word)
CHANGES = [
    ([("laptop", "ab" * 16, NOW)], [], "added"),
    ([], [("cd" * 16, NOW)], "revoked"),
    ([("laptop", "ab" * 16, NOW)], [("cd" * 16, NOW)], "changed"),
]


@pytest.mark.parametrize(("added", "revoked", "word"), CHANGES)
def test_device_change_notice(
    added: list[tuple[str, str, int]], revoked: list[tuple[str, int]], word: str
) -> None:
    raw = device_change_notice(
        user_address=USER, onion_domain=ONION, added=added, revoked=revoked, version=7, now=NOW
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == f"A device was {word} on your account"
    assert msg["X-Onionpost-Notice"] == "devices-changed"
    assert msg["Message-ID"] == f"<devices.7.{NOW}@{ONION}>"
    body = msg.get_content()
    assert "version 7" in body
    for _, device_id, _ in added:
        assert f"added:   laptop ({device_id[:12]})" in body
    for device_id, _ in revoked:
        assert f"revoked: {device_id[:12]}" in body
    assert "onionpost devices revoke" in body


def test_device_names_cannot_inject_headers() -> None:
    raw = device_change_notice(
        user_address=USER,
        onion_domain=ONION,
        added=[("evil\r\nBcc: x@y", "ab" * 16, NOW)],
        revoked=[],
        version=2,
        now=NOW,
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Bcc"] is None
    assert "evil Bcc: x@y" in msg.get_content()
