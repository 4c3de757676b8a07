"""How errors read in mail clients (gateway/replies.py): IMAP codes, SMTP lines, one safe line."""

from __future__ import annotations

import re

import pytest

from gateway.replies import (
    AUTH_FAILED,
    SMTP_AUTH_FAILED,
    ImapReply,
    imap_reply,
    one_line,
    smtp_idle_timeout,
    smtp_protocol_reply,
    smtp_queued,
    smtp_reply,
    smtp_too_many_recipients,
    unexpected_imap_reply,
)
from onionpost.core.errors import (
    AddressError,
    AuthenticationFailed,
    DiskFull,
    FilingDeferred,
    FolderExists,
    FolderNotFound,
    FolderProtected,
    InvalidFolderName,
    MessageTooLarge,
    OnionpostError,
    PasswordRejected,
    PermanentDeliveryError,
    QuotaExceeded,
    SenderNotAllowed,
    StoreError,
    UnknownLocalUser,
    UsageError,
)

ONE_LINE = [
    ("plain", "plain"),
    ("  padded  ", "padded"),
    ("two\r\nlines", "two lines"),
    ("tab\tand\x00nul", "tab and nul"),
    ("caf\u00e9\u2014\u00e9ok", "caf ok"),  # a run of non-ASCII becomes one space
    ("", "The request failed."),
    ("\r\n\t", "The request failed."),
    ("x" * 400, "x" * 400),
    ("x" * 401, "x" * 397 + "..."),
]


@pytest.mark.parametrize(("text", "line"), ONE_LINE)
def test_one_line(text: str, line: str) -> None:
    assert one_line(text) == line
    assert re.fullmatch(r"[\x20-\x7e]*", line)


# (error, IMAP response code); the text is always the error's own sentence on one line
IMAP: list[tuple[OnionpostError, str | None]] = [
    (FolderNotFound(), "NONEXISTENT"),
    (FolderExists(), "ALREADYEXISTS"),
    (FolderProtected(), "CANNOT"),
    (InvalidFolderName(), "CANNOT"),
    (QuotaExceeded(), "OVERQUOTA"),  # before the temporary rule: it is temporary too
    (MessageTooLarge(), "TOOBIG"),
    (PasswordRejected(), "CANNOT"),
    (UsageError("No.\nReally."), None),
]


@pytest.mark.parametrize(("exc", "code"), IMAP)
def test_imap_reply(exc: OnionpostError, code: str | None) -> None:
    assert imap_reply(exc) == ImapReply(code, one_line(str(exc)))


@pytest.mark.parametrize("exc", [StoreError(), FilingDeferred("Dovecot is busy.")])
def test_temporary_errors_say_try_again(exc: OnionpostError) -> None:
    reply = imap_reply(exc)
    assert reply.code == "UNAVAILABLE"
    assert reply.text == one_line(f"{exc} Try again in a moment.")


@pytest.mark.parametrize(
    "exc", [AuthenticationFailed(), UnknownLocalUser(), UnknownLocalUser("no user 'mallory'")]
)
def test_failed_logins_all_read_the_same(exc: OnionpostError) -> None:
    """Never tell a client whether the user or the password was wrong."""
    assert imap_reply(exc) == AUTH_FAILED
    assert AUTH_FAILED.code == "AUTHENTICATIONFAILED"
    assert "mallory" not in AUTH_FAILED.text


def test_unexpected_imap_reply_is_a_server_bug() -> None:
    reply = unexpected_imap_reply()
    assert reply.code == "SERVERBUG" and reply.text == one_line(reply.text)


# (error, the start of the SMTP reply line)
SMTP: list[tuple[OnionpostError, str]] = [
    (AuthenticationFailed(), "535 5.7.8 "),
    (UnknownLocalUser(), "550 5.1.1 "),
    (SenderNotAllowed(), "550 5.7.1 "),
    (AddressError(), "550 5.1.3 "),
    (MessageTooLarge(), "552 5.3.4 "),
    (QuotaExceeded(), "452 4.2.2 "),
    (DiskFull(), "452 4.3.1 "),  # RFC 5321 "insufficient system storage"
    (StoreError(), "451 4.3.0 "),  # not listed: temporary gives 451
    (UsageError(), "554 5.0.0 "),  # not listed: permanent gives 554
    # the instance's code is used when it is a valid enhanced code
    (PermanentDeliveryError("no", code="5.7.1"), "554 5.7.1 "),
    # a malformed instance code falls back to the class default
    (UsageError("bad", code="banana"), "554 5.0.0 "),
    # the class digits of both codes always agree
    (StoreError("odd", code="5.3.0"), "451 4.3.0 "),
    (MessageTooLarge("big", code="4.3.4"), "552 5.3.4 "),
]


@pytest.mark.parametrize(("exc", "start"), SMTP)
def test_smtp_reply(exc: OnionpostError, start: str) -> None:
    line = smtp_reply(exc)
    assert line == start + one_line(str(exc))


def test_smtp_fixed_lines() -> None:
    assert SMTP_AUTH_FAILED.startswith("535 5.7.8 The user name or password is wrong.")
    assert smtp_queued(42) == "250 2.0.0 Ok: queued as 42"
    assert smtp_too_many_recipients(50).startswith("452 4.5.3 Too many recipients: at most 50 ")
    assert smtp_idle_timeout(300.0) == (
        "421 4.4.2 Closing the connection: nothing arrived for 300 seconds."
    )
    assert smtp_idle_timeout(0.5).endswith("for 0.5 seconds.")


PROTOCOL = [
    ("250 OK", "250 2.0.0 OK"),
    ("503 Error: need RCPT command", "503 5.5.1 Send at least one accepted RCPT TO before DATA."),
    ("501 Error: SMTPUTF8 disabled", "555 5.5.4 SMTPUTF8 is not offered: onionpost addresses "
     "are plain ASCII."),
    # an unknown command is never echoed back (it may be a pipelined password)
    ('500 Error: command "c2VjcmV0" not recognized', "500 5.5.1 Unknown command."),
    ("501 Syntax: MAIL FROM:<address>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("502 Could not VRFY bob", "501 5.1.3 Write the address as <local@<56-character v3 "
     "onion>.onion>."),
    ("421 4.7.0 AUTH sent too many times", "421 4.7.0 Too many AUTH commands on one "
     "connection; closing it."),
    # anything else, including lines that already carry an enhanced code, passes unchanged
    ("250 2.1.0 Sender OK.", "250 2.1.0 Sender OK."),
    ("999 what", "999 what"),
    ("", ""),
    ("501", "501"),
    ("501 Syntax", "501 Syntax"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "reworded"), PROTOCOL)
def test_smtp_protocol_reply(line: str, reworded: str) -> None:
    assert smtp_protocol_reply(line) == reworded


def test_every_reworded_stock_reply_has_an_enhanced_code_of_the_same_class() -> None:
    from gateway.replies import _SMTP_STOCK

    for original, line in _SMTP_STOCK.items():
        m = re.fullmatch(r"([245])\d\d ([245])\.\d{1,3}\.\d{1,3} \S.*", line)
        assert m, (original, line)
        assert m.group(1) == m.group(2), line
