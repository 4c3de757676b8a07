"""The shortcut past the full header parse (issue 12): a field ``_plainly_parsed`` passes is
one the full check (``_server_can_parse``) passes too, so normalising skips no repair.

The fields that differ in every message (Subject, Message-ID, References) miss the memo of
repairs, and the full parse of them was most of the cost of normalising a small message.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

import onionpost.core.normalize as normalize_module
from onionpost.core.normalize import normalize

NOW = 1_800_000_000

_ATEXT = "ABCXYZabcxyz0189!#$%&'*+/=?^_`{|}~-"
_atoms = st.text(alphabet=_ATEXT, min_size=1, max_size=12)
_labels = st.text(alphabet="abcxyzABC019-", min_size=1, max_size=10)
_dot_atom = st.lists(_atoms, min_size=1, max_size=4).map(".".join)
_domain = st.lists(_labels, min_size=1, max_size=4).map(".".join)
_msgid = st.builds("<{}@{}>".format, _dot_atom, _domain)
_plain = st.text(alphabet=[chr(c) for c in range(0x20, 0x7F)] + ["\t"], max_size=200)
_unstructured_names = st.sampled_from(
    ["Subject", "References", "In-Reply-To", "Content-Description", "Keywords", "X-Mailer"]
)


def _lines(name: str, value: str, fold_at: int) -> list[bytes]:
    """The field as the normaliser holds it: a line, then continuation lines (each starts
    with white space), folded before a space when there is one."""
    text = f"{name}: {value}"
    cut = text.find(" ", len(name) + 2 + fold_at)
    if cut < 0:
        return [text.encode("ascii")]
    return [text[:cut].encode("ascii"), text[cut:].encode("ascii")]


def _both(name: str, lines: list[bytes]) -> tuple[bool, bool]:
    lname = name.lower().encode("ascii")
    return (
        normalize_module._plainly_parsed(lname, lines),
        normalize_module._server_can_parse(lines),
    )


@given(_unstructured_names, _plain, st.integers(min_value=0, max_value=200))
def test_plain_text_in_an_unstructured_field_needs_no_parse(
    name: str, value: str, fold_at: int
) -> None:
    plain, parsed = _both(name, _lines(name, value, fold_at))
    if plain:
        assert parsed
    if "=?" not in value:
        assert plain  # the shortcut is taken, or it would save nothing


@given(st.lists(_msgid, min_size=1, max_size=5), st.integers(min_value=0, max_value=80))
def test_plain_message_ids_need_no_parse(ids: list[str], fold_at: int) -> None:
    one = _lines("Message-ID", ids[0], fold_at)
    assert _both("Message-ID", one) == (True, True)
    many = _lines("References", " ".join(ids), fold_at)
    assert _both("References", many) == ("=?" not in " ".join(ids), True)


def test_what_the_shortcut_leaves_to_the_full_parse() -> None:
    cases = {
        ("Message-ID", "<no-at-sign>"): False,
        ("Message-ID", "<a@b> <c@d>"): False,
        ("Message-ID", "a@b"): False,
        ("Subject", "=?utf-8?q?caf=C3=A9?="): False,  # encoded words: the parse decodes them
        ("Date", "Thu, 01 Jan 2026 00:00:00 +0000"): False,  # parsed by a class of its own
        ("From", "alice@example.org"): False,
        ("Content-Type", "text/plain"): False,
        ("Subject", "hello"): True,
        ("Message-ID", "<bench.1.0a1b@bench>"): True,
    }
    for (name, value), plain in cases.items():
        lname = name.lower().encode("ascii")
        assert normalize_module._plainly_parsed(lname, [f"{name}: {value}".encode()]) is plain


def test_a_message_normalises_the_same_with_and_without_the_shortcut(monkeypatch) -> None:
    message = (
        b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\n"
        b"Subject: a plain subject\r\n\tthat is folded\r\nMessage-ID: <x.1@example.org>\r\n"
        b"References: <a@b.c>\r\n <d@e.f>\r\nIn-Reply-To: <d@e.f>\r\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\nKeywords: one, two\r\n\r\nbody\r\n"
    )
    normalize_module._fix_field_memo.cache_clear()
    quick = normalize(message, now=NOW)
    monkeypatch.setattr(normalize_module, "_plainly_parsed", lambda lname, lines: False)
    normalize_module._fix_field_memo.cache_clear()
    assert normalize(message, now=NOW) == quick
