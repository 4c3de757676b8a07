"""The memo of field repairs (issue 12): remembered repairs are the same as fresh ones.

``normalize`` remembers how each short header field was repaired, because most fields recur
from message to message.  What must hold: a message normalises to the same bytes whether its
fields were seen before or not, good fields still come out byte for byte, and the memo never
hands out a list the caller could change under the next message.
"""

from __future__ import annotations

import onionpost.core.normalize as normalize_module
from onionpost.core.normalize import FIELD_MEMO_BYTES, normalize

NOW = 1_800_000_000

GOOD = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nbody\r\n"
)
BROKEN = (
    b"From: J\xc3\xbcrgen <j@example.org>\r\nTo: bob@example.org\r\n"
    b"Subject: =?bogus-charset?Q?x?= caf\xe9\r\nDate: not a date\r\n"
    b"Message-ID: <2@example.org>\r\n\r\nbody\r\n"
)


def fresh(message: bytes) -> bytes:
    normalize_module._fix_field_memo.cache_clear()
    return normalize(message, now=NOW)


def test_remembered_repairs_equal_fresh_ones() -> None:
    for message in (GOOD, BROKEN):
        first = fresh(message)
        again = normalize(message, now=NOW)  # every field now comes from the memo
        assert again == first
        assert normalize_module._fix_field_memo.cache_info().hits > 0


def test_good_mail_is_untouched_through_the_memo() -> None:
    assert fresh(GOOD) == GOOD
    assert normalize(GOOD, now=NOW) == GOOD


def test_a_repaired_field_is_not_shared_between_messages() -> None:
    fresh(BROKEN)
    lines = [b"Subject: =?bogus-charset?Q?x?= caf\xe9"]
    one = normalize_module._fix_field(lines)
    one[0].append(b" tampered")
    two = normalize_module._fix_field(lines)
    assert b" tampered" not in two[0]


def test_long_fields_are_not_remembered() -> None:
    normalize_module._fix_field_memo.cache_clear()
    subject = b"Subject: " + b"word " * (FIELD_MEMO_BYTES // 5 + 10)
    message = subject + b"\r\nFrom: a@example.org\r\n\r\nbody\r\n"
    assert normalize(message, now=NOW) == normalize(message, now=NOW)
    assert normalize_module._fix_field_memo.cache_info().currsize == 1  # only From
