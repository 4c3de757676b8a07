"""onionpost.core.normalize: broken mail is repaired, good mail is left byte for byte alone.

The checks that the output "parses" use the standard library's parser; that Dovecot serves
what we file (ENVELOPE, BODYSTRUCTURE) is checked against the real Dovecot in
tests/integration/test_dovecot.py.
"""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import onionpost.core.normalize as normalize_module
from onionpost.core.normalize import (
    MAX_DEPTH,
    MAX_LINE,
    header_end,
    message_id,
    normalize,
    normalize_header,
)

NOW = 1_800_000_000


def header_block(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0]


def assert_well_formed(out: bytes) -> None:
    assert b"\n" not in out.replace(b"\r\n", b""), "every line ends in CRLF"
    head = header_block(out)
    assert head.isascii()
    for line in head.split(b"\r\n"):
        assert len(line) <= MAX_LINE
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Date"] is not None
    assert parsed["Message-ID"] is not None
    for part in parsed.walk():
        for _, value in part.items():
            str(value)


GOOD_SIGNED = (
    b"From: Alice <alice@aaaa.onion>\r\n"
    b"To: Bob <bob@bbbb.onion>\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    b"Message-ID: <1@aaaa.onion>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/signed; protocol="application/pgp-signature";\r\n'
    b' micalg=pgp-sha256; boundary="sig"\r\n'
    b"\r\n"
    b"--sig\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Hall\xc3\xb6chen \r\n"
    b"--sig\r\n"
    b"Content-Type: application/pgp-signature\r\n"
    b"\r\n"
    b"-----BEGIN PGP SIGNATURE-----\r\nabc\r\n-----END PGP SIGNATURE-----\r\n"
    b"--sig--\r\n"
)


def nested(depth: int) -> bytes:
    body = b"leaf\r\n"
    for level in range(depth, 0, -1):
        body = (
            b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
            + body
            + b"\r\n--b%d--\r\n" % level
        )
    return (
        b"From: a@b.c\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <n@b.c>\r\n"
        b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n--b0\r\n" + body + b"\r\n--b0--\r\n"
    )


# -- good mail is untouched ---------------------------------------------------------------


def test_a_well_formed_message_is_returned_as_is() -> None:
    assert normalize(GOOD_SIGNED, now=NOW) is GOOD_SIGNED


def test_attachments_survive_byte_for_byte_when_headers_are_repaired() -> None:
    broken = GOOD_SIGNED.replace(b"Subject: ", b"Sender: x@y.z, q@r.s\r\nSubject: ", 1)
    out = normalize(broken, now=NOW)
    assert out != broken
    assert out.split(b"\r\n\r\n", 1)[1] == GOOD_SIGNED.split(b"\r\n\r\n", 1)[1]
    assert_well_formed(out)


# -- each repair ----------------------------------------------------------------------------


def test_sender_with_two_addresses_is_moved_aside() -> None:
    out = normalize(b"From: a@b.c\r\nSender: x@y.z, q@r.s\r\n\r\nhi\r\n", now=NOW)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Sender"] is None
    assert parsed["X-Original-Sender"] == "x@y.z, q@r.s"
    assert parsed["From"] == "a@b.c"
    assert_well_formed(out)


def test_nested_message_headers_are_repaired_too() -> None:
    inner = b"From: x@y\r\nSender: a@b, c@d\r\n\r\ninner\r\n"
    out = normalize(b"From: a@b.c\r\nContent-Type: message/rfc822\r\n\r\n" + inner, now=NOW)
    assert b"X-Original-Sender: a@b, c@d" in out
    assert_well_formed(out)


def test_unparseable_date_is_moved_aside_and_replaced() -> None:
    out = normalize(b"From: a@b.c\r\nDate: yesterday at noon\r\n\r\nx\r\n", now=NOW)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["X-Original-Date"] == "yesterday at noon"
    assert parsed["Date"].datetime == datetime.fromtimestamp(NOW, UTC)


def test_missing_date_and_message_id_are_added_deterministically() -> None:
    message = b"From: a@b.c\r\n\r\nhello\r\n"
    out = normalize(message, now=NOW)
    assert out == normalize(message, now=NOW)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Message-ID"].endswith("@onionpost.invalid>")
    assert out.endswith(b"\r\n\r\nhello\r\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Subject: h\u00e9llo".encode(), "h\u00e9llo"),  # raw UTF-8
        ("Subject: h\u00e9llo".encode("latin-1"), "h\u00e9llo"),  # not UTF-8 at all
        (b"Subject: =?bogus?Q?h=E9llo?=", "h\u00e9llo"),  # unknown charset
        (b"Subject: =?utf-8?B?!!!?= ok", "!!! ok"),  # payload that is not base64
        (b"Subject: a\x00b\x07c", "a b c"),  # control characters
    ],
)
def test_broken_encodings_become_7bit_encoded_words(raw: bytes, expected: str) -> None:
    out = normalize(b"From: a@b.c\r\n" + raw + b"\r\n\r\nbody\r\n", now=NOW)
    assert header_block(out).isascii()
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Subject"] == expected
    assert_well_formed(out)


def test_non_ascii_display_name_is_encoded_not_dropped() -> None:
    out = normalize("From: Jos\u00e9 <jose@x.onion>\r\n\r\nb\r\n".encode("latin-1"), now=NOW)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["From"].addresses[0].display_name == "Jos\u00e9"
    assert parsed["From"].addresses[0].addr_spec == "jose@x.onion"


def test_unknown_body_charset_is_replaced_by_one_that_decodes() -> None:
    message = (
        b"From: a@b.c\r\nContent-Type: text/plain; charset=x-nonsense; format=flowed\r\n"
        b"\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    )
    out = normalize(message, now=NOW)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed.get_content_charset() == "utf-8"
    assert parsed.get_param("format") == "flowed"
    assert parsed.get_content() == "Gr\u00fc\u00dfe\r\n"


def test_huge_header_is_folded_and_capped() -> None:
    message = b"From: a@b.c\r\nSubject: " + b"x" * 200_000 + b"\r\nX-Big: " + b"y " * 100_000
    message += b"\r\n\r\nbody\r\n"
    out = normalize(message, now=NOW)
    assert len(header_block(out)) < 140 * 1024
    assert out.endswith(b"\r\n\r\nbody\r\n")
    assert_well_formed(out)


def test_many_header_fields_are_dropped_but_essential_ones_kept() -> None:
    noise = b"".join(b"X-Noise-%d: %s\r\n" % (i, b"z" * 500) for i in range(1000))
    message = noise + b"From: a@b.c\r\nSubject: keep me\r\n\r\nbody\r\n"
    out = normalize(message, now=NOW)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Subject"] == "keep me"
    assert int(parsed["X-Onionpost-Dropped-Headers"]) > 0
    assert_well_formed(out)


def multipart_depth(message: bytes) -> int:
    """How many multiparts deep the first leaf sits, as the standard library parses it."""
    part = email.message_from_bytes(message, policy=email.policy.default)
    depth = 0
    while part.is_multipart():
        part = part.get_payload(0)
        depth += 1
    return depth


def test_deep_nesting_is_cut_at_the_limit_and_kept_as_an_attachment() -> None:
    # Far past the limit.  Whether a recursive parser such as pymap's fails on it unaided
    # depends on the Python version (3.11 raises RecursionError at this depth, 3.13 does not),
    # so what is checked is the cut itself, and that the result parses.
    message = nested(100)
    assert multipart_depth(message) == 101 > MAX_DEPTH + 1
    out = normalize(message, now=NOW)
    assert_well_formed(out)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    attachments = [p for p in parsed.walk() if p.get_filename() == "nested-part.eml"]
    assert len(attachments) == 1
    depth = multipart_depth(out)
    assert depth <= MAX_DEPTH + 1
    # The excess is intact inside the attachment: the original bytes of every level cut off.
    kept = attachments[0].get_payload(decode=True)
    assert kept in message
    assert depth + multipart_depth(kept) == multipart_depth(message)
    assert b"leaf\r\n" in kept


def test_bare_lf_becomes_crlf() -> None:
    out = normalize(b"From: a@b.c\nSubject: x\n\nline1\nline2\n", now=NOW)
    assert out.endswith(b"\r\n\r\nline1\r\nline2\r\n")
    assert_well_formed(out)


def test_no_header_at_all() -> None:
    out = normalize(b"just some text\r\nmore\r\n", now=NOW)
    assert out.endswith(b"\r\n\r\njust some text\r\nmore\r\n")
    assert_well_formed(out)


def test_header_without_separator_before_body() -> None:
    out = normalize(b"From: a@b.c\r\nSubject: s\r\nthis is the body\r\n", now=NOW)
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["Subject"] == "s"
    assert parsed.get_content() == "this is the body\r\n"


def test_message_id_lookup() -> None:
    assert message_id(b"Subject: x\r\nMessage-ID:\r\n <abc@d>\r\n\r\nb") == "<abc@d>"
    assert message_id(b"Subject: x\n\nMessage-ID: <no@body>\n") is None
    assert message_id(b"\xff\xfe garbage") is None


# -- properties -----------------------------------------------------------------------------

_header_names = st.sampled_from(
    ["From", "Sender", "To", "Cc", "Reply-To", "Date", "Subject", "Message-ID", "In-Reply-To",
     "Content-Type", "Content-Disposition", "Content-Transfer-Encoding", "MIME-Version",
     "X-Anything", "Resent-Sender", "References", "Sender ", "Date ", "Content-Type "]
)  # fmt: skip
_header_values = st.one_of(
    st.binary(max_size=80),
    st.sampled_from(
        [b"a@b.c, d@e.f", b"<x@y>", b"=?x-bad?B?AAAA?=", b"=?utf-8?Q?=FF?=", b"\xff\xfe",
         b"multipart/mixed; boundary=q", b"message/rfc822", b"text/plain; charset=nope",
         b"undisclosed-recipients:;", b"Mon, 32 Foo 2024 99:99:99 +9999", b'"unterminated',
         b"attachment; filename*=utf-8''%ff"]
    ),
)  # fmt: skip
_fields = st.lists(st.tuples(_header_names, _header_values, st.booleans()), max_size=8).map(
    lambda items: b"".join(
        name.encode() + b": " + value + (b"\r\n folded" if fold else b"") + b"\r\n"
        for name, value, fold in items
    )
)
_mime_like = st.recursive(
    st.tuples(_fields, st.binary(max_size=60)).map(lambda t: t[0] + b"\r\n" + t[1]),
    lambda inner: st.tuples(_fields, st.lists(inner, max_size=3)).map(
        lambda t: (
            t[0]
            + b"Content-Type: multipart/mixed; boundary=q\r\n\r\n"
            + b"".join(b"--q\r\n" + part + b"\r\n" for part in t[1])
            + b"--q--\r\n"
        )
    ),
    max_leaves=12,
)
_messages = st.one_of(st.binary(max_size=400), _mime_like)


@pytest.fixture
def no_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the last-resort wrapper fail loudly: it exists for bugs, and we want none."""

    def refuse(message: bytes, now: int) -> bytes:
        raise AssertionError("normalize fell back to its last resort")

    monkeypatch.setattr(normalize_module, "_opaque", refuse)


_settings = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_settings
@given(_messages, st.integers(min_value=-(2**40), max_value=2**40))
def test_any_bytes_give_well_formed_mail(no_fallback: None, message: bytes, now: int) -> None:
    out = normalize(message, now=now)
    assert_well_formed(out)


@_settings
@given(_messages)
def test_normalizing_twice_changes_nothing(no_fallback: None, message: bytes) -> None:
    once = normalize(message, now=NOW)
    assert normalize(once, now=NOW) == once


# -- a large message's header alone --------------------------------------------------------

DIGEST = bytes(range(16))


def test_a_good_header_is_kept_as_it_is() -> None:
    head = header_block(GOOD_SIGNED)
    assert normalize_header(head, now=NOW, digest=DIGEST) == head + b"\r\n\r\n"


def test_a_header_is_repaired_as_a_whole_message_would_be() -> None:
    head = (
        b"From: Alice <alice@aaaa.onion>\nSender: a@b.c, d@e.f\nSubject: Gr\xc3\xbc\xc3\x9fe\n"
        b"Date: yesterday"
    )
    out = normalize_header(head, now=NOW, digest=DIGEST)
    assert out.endswith(b"\r\n\r\n")
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    assert parsed["X-Original-Sender"] == "a@b.c, d@e.f"
    assert parsed["Subject"] == "Grüße"
    assert parsed["X-Original-Date"] == "yesterday"
    assert parsed["Message-ID"] == f"<{DIGEST.hex()}@onionpost.invalid>"


@_settings
@given(st.binary(max_size=400), st.integers(min_value=-(2**40), max_value=2**40))
def test_any_header_bytes_give_a_well_formed_header(
    monkeypatch: pytest.MonkeyPatch, head: bytes, now: int
) -> None:
    def refuse(now: int, digest: bytes) -> bytes:
        raise AssertionError("normalize_header fell back to its last resort")

    monkeypatch.setattr(normalize_module, "_minimal_header", refuse)
    while header_end(head) is not None:  # a header block as sync cuts it: no blank line
        head = head.replace(b"\r\n\r\n", b"\r\n").replace(b"\n\n", b"\n")
    out = normalize_header(head, now=now, digest=DIGEST)
    assert out.endswith(b"\r\n\r\n")
    assert out.count(b"\r\n\r\n") == 1
    assert_well_formed(out + b"body\r\n")
