"""``visible_addresses`` gives the standard library parser's answers without its cost.

The old implementation (the header block through ``BytesHeaderParser``, To and Cc through
``getaddresses``) is kept here as the reference; the new one reads the header block itself
(``field_values``) and must agree with it on every header, however odd.
"""

from __future__ import annotations

import random
from email.parser import BytesHeaderParser
from email.utils import getaddresses

import pytest

from onionpost.device.sending import _header_end, field_values, visible_addresses


def reference(message: bytes) -> set[str]:
    """The implementation before: the whole header block through the standard parser."""
    head_end, sep = _header_end(message)
    head = message if head_end < 0 else message[: head_end + len(sep)]
    headers = BytesHeaderParser().parsebytes(head)
    found: set[str] = set()
    for name in ("to", "cc"):
        for _, addr in getaddresses([str(v) for v in headers.get_all(name, [])]):
            if addr:
                found.add(addr.strip().lower())
    return found


def reference_values(head: bytes, name: str) -> list[str]:
    return [str(v) for v in BytesHeaderParser().parsebytes(head).get_all(name, [])]


BODY = b"Hello,\r\nTo: hidden@body.example\r\n\r\nbye\r\n"

TRICKY: list[bytes] = [
    b"",
    b"To: a@x.onion\r\n\r\n" + BODY,
    b"To: a@x.onion\n\n" + BODY.replace(b"\r\n", b"\n"),
    b"From: me@x\r\nTo: A@X.Onion, b@y.onion\r\nCc: c@z.onion\r\n\r\nbody",
    # folded lines, CRLF and LF, tabs
    b"To: a@x.onion,\r\n b@y.onion,\r\n\tc@z.onion\r\nSubject: s\r\n\r\n",
    b"To: a@x.onion,\n b@y.onion,\n\tc@z.onion\nSubject: s\n\n",
    b"To:\r\n a@x.onion\r\n\r\n",
    b"To:a@x.onion\r\n\r\n",
    b"to: a@x.onion\r\nCC: b@y.onion\r\ncC: c@y.onion\r\n\r\n",
    # duplicate To fields
    b"To: a@x.onion\r\nSubject: x\r\nTo: b@y.onion\r\nTo: c@z.onion\r\n\r\n",
    # encoded words, display names, quoted local parts, comments, groups, routes
    b"To: =?utf-8?q?J=C3=B6rg?= <jorg@x.onion>, =?utf-8?b?w6TDtsO8?= <u@y.onion>\r\n\r\n",
    b'To: "Doe, John" <john@x.onion>, "a\\"b" <q@y.onion>\r\n\r\n',
    b'To: "john doe"@x.onion, "a b"@y.onion\r\n\r\n',
    b"To: a@x.onion (Alice), (comment) b@y.onion, c@z.onion (nested (comment))\r\n\r\n",
    b"To: friends: a@x.onion, b@y.onion;, c@z.onion\r\nCc: undisclosed-recipients:;\r\n\r\n",
    b"To: <@route,@other:a@x.onion>\r\n\r\n",
    b"To: a@x.onion, , ,b@y.onion,\r\n\r\n",
    b"To: <a@x.onion>\r\n\r\n",
    b"To: broken <a@x.onion\r\n\r\n",
    b"To: a@@x.onion, @y.onion, plain\r\n\r\n",
    b"To: Name <A@X.ONION >\r\n\r\n",
    # the header block's end: none at all, only LF, mixed endings, lone CR
    b"To: a@x.onion\r\nCc: b@y.onion",
    b"To: a@x.onion\r\nCc: b@y.onion\r\n",
    b"To: a@x.onion\r\nCc: b@y.onion\n\nTo: c@z.onion\r\n\r\n",
    b"To: a@x.onion\n\r\nCc: b@y.onion\r\n\r\n",
    b"To: a@x.onion\rCc: b@y.onion\r\r",
    b"To: a@x.onion\r b@y.onion\r\n\r\n",
    b"To: a@x.onion\r\n\rCc: b@y.onion\r\n\r\n",
    b"To: a@x.onion\r\n \r\n b@y.onion\r\n\r\n",
    # lines that end the block early, or are skipped
    b"Subject: x\r\nnot a header\r\nTo: a@x.onion\r\n\r\n",
    b"X Bad: x\r\nTo: a@x.onion\r\n\r\n",
    b"To : a@x.onion\r\nCc\t: b@y.onion\r\n\r\n",
    b" leading continuation\r\nTo: a@x.onion\r\n\r\n",
    b"From alice Thu Dec  3 10:00:00 2026\r\nTo: a@x.onion\r\n\r\n",
    b"To: a@x.onion\r\nFrom someone\r\n b@y.onion\r\nCc: c@z.onion\r\n\r\n",
    b"To: a@x.onion\r\n: no name\r\n b@y.onion\r\nCc: c@z.onion\r\n\r\n",
    b"To: a@x.onion\r\nFrom bob\r\n\r\n",
    b"X-To: a@x.onion\r\nResent-To: b@y.onion\r\nBcc: c@z.onion\r\n\r\n",
    b"To: a@x.onion\r\nTo\r\n\r\n",
    b"To:: a@x.onion\r\n\r\n",
    # 8-bit bytes in values and names, NUL, other controls
    "To: Jörg <jorg@x.onion>\r\nCc: Ünï <u@y.onion>\r\n\r\n".encode(),
    b"To: \xff\xfe <a@x.onion>, b\xe9@y.onion\r\n\r\n",
    b"To: a@x.onion,\r\n \xc3\xa4 <b@y.onion>\r\n\r\n",
    b"T\xf6: a@x.onion\r\nCc: b@y.onion\r\n\r\n",
    b"To: a\x00b@x.onion\r\nCc: \x0bc@y.onion\x0c\r\n\r\n",
    b"To: a@x.onion\x85b@y.onion\r\n\r\n",
    # very long headers
    b"To: " + b", ".join(b"u%d@x%d.onion" % (i, i) for i in range(2000)) + b"\r\n\r\n",
    b"To: a@x.onion,\r\n" + b"".join(b" u%d@y.onion,\r\n" % i for i in range(3000)) + b"\r\n",
    b"Subject: " + b"x" * 100_000 + b"\r\nTo: a@x.onion\r\n\r\n",
    b"To: a@x.onion\r\n" + b"X-Pad: yyy\r\n" * 5000 + b"Cc: b@y.onion\r\n\r\n",
]


@pytest.mark.parametrize("message", TRICKY, ids=range(len(TRICKY)))
def test_same_answers_as_the_standard_parser(message: bytes) -> None:
    assert visible_addresses(message) == reference(message)
    assert visible_addresses(message + BODY) == reference(message + BODY)
    for name in ("to", "cc", "subject"):
        assert field_values(message, (name.encode(),)) == {
            name.encode(): reference_values(message, name)
        }


def test_remembered_answers_are_not_shared() -> None:
    message = b"To: a@x.onion\r\n\r\n"
    first = visible_addresses(message)
    first.add("mallory@evil.onion")
    assert visible_addresses(message) == {"a@x.onion"}


FRAGMENTS = [
    b"To:", b"to:", b"Cc:", b"CC :", b"Subject:", b"From ", b"From:", b":", b" ", b"\t",
    b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\n\n", b"a@x.onion", b"B@Y.onion", b",", b";",
    b"<", b">", b'"', b"(", b")", b"\\", b"=?utf-8?q?=C3=A4?=", b"grp:", b"\xe4", b"\xff",
    b"@", b"x", b"Name ", b"\x00",
]  # fmt: skip


def test_random_headers_agree() -> None:
    rng = random.Random(20261203)
    for _ in range(3000):
        message = b"".join(rng.choice(FRAGMENTS) for _ in range(rng.randrange(1, 40)))
        assert visible_addresses(message) == reference(message), message
        assert field_values(message, (b"to", b"cc")) == {
            b"to": reference_values(message, "to"),
            b"cc": reference_values(message, "cc"),
        }, message
