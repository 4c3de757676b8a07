"""Typed fingerprints and scanned contact codes (onionpost.core.trust): pure, no I/O."""

from __future__ import annotations

import pytest

from onionpost.core.address import Address
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.crypto.primitives import ed25519_public
from onionpost.core.errors import UsageError
from onionpost.core.trust import check_typed, compact, fingerprint_matches, parse_scan, scan_payload

ONION = ed25519_public(b"\x01" * 32)
UIK = ed25519_public(b"\x02" * 32)
OTHER = ed25519_public(b"\x03" * 32)


def test_a_fingerprint_matches_however_it_is_typed() -> None:
    fp = fingerprint(UIK)
    assert len(compact(fp)) == 20
    for typed in (
        fp,
        fp.upper(),
        fp.replace("-", " "),
        f"  {fp.replace('-', '')}\n",
        fp.replace("-", ":"),
    ):
        assert fingerprint_matches(typed, UIK), typed
        assert check_typed(typed) == compact(fp)
    assert not fingerprint_matches(fp, OTHER)
    assert not fingerprint_matches(fp[:-1], UIK)  # every character counts
    assert not fingerprint_matches(fp + "a", UIK)
    assert not fingerprint_matches("", UIK)


@pytest.mark.parametrize(
    ("typed", "words"),
    [("", "Type the fingerprint"), ("abcd", "is not a fingerprint"), ("1" * 20, "2-7")],
)
def test_what_is_not_a_fingerprint_is_said_so(typed: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        check_typed(typed)


def test_scan_payload_round_trip() -> None:
    for local in ("bob", "b#o.b"):  # '#' may appear in a local part: the last one splits
        address = Address.for_key(local, ONION)
        payload = scan_payload(address, UIK)
        assert payload == f"onionpost:{address}#{fingerprint(UIK)}"
        got, fp = parse_scan(payload)
        assert got == address and fp == compact(fingerprint(UIK))
        assert parse_scan("  " + payload.upper() + "\n") == (address, fp)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("bob@x.onion#abcd", "should start with 'onionpost:'"),
        ("onionpost:bob@x.onion", "no fingerprint"),
        ("onionpost:bob@x.onion#" + "a" * 20, "address is not valid"),
        (f"onionpost:{Address.for_key('bob', ONION)}#short", "is not a fingerprint"),
    ],
)
def test_bad_scans_are_refused_with_words(text: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        parse_scan(text)


def test_contact_code_vector_of_protocol_md() -> None:
    """docs/protocol.md §4, "Contact code": bob of the §13.2 test vectors."""
    bob_uik = bytes.fromhex("8797536c85cb02b8c0ca1f87e2497b3f6bc3842875f2abca0efb4d8788cd3f7d")
    bob = Address.parse("bob@jeii7jgiyqm7crisv3a2755u2lgcwqn2uy3kth6eq7bfszmin2phrhad.onion")
    vector = f"onionpost:{bob}#7nox-horm-ezpm-q45y-u6cj"
    assert scan_payload(bob, bob_uik) == vector
    assert parse_scan(vector) == (bob, "7noxhormezpmq45yu6cj")
