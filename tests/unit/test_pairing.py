"""Invite and pairing codes and the pairing exchange (onionpost/core/pairing.py), without I/O."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionpost.core.crypto.keys import DeviceSecrets, ServerSecrets
from onionpost.core.crypto.primitives import SeededRandom
from onionpost.core.errors import MalformedData, PairingFailed
from onionpost.core.pairing import BadCode, Code, Joiner, JoinGrant, JoinRequest, Offer

from .crypto_world import make_user

NOW = 1_700_000_000
ONION = ServerSecrets.generate(NOW, rng=SeededRandom(b"pairing-test")).onion_pk


def code(kind: str = "invite", seed: bytes = b"c") -> Code:
    return Code.generate(kind, ONION, rng=SeededRandom(seed))  # type: ignore[arg-type]


def test_a_code_reads_back_however_it_is_written() -> None:
    c = code()
    text = c.text()
    assert len(c.compact()) == 80 and text.count("-") == 15
    for variant in (
        text,
        text.upper(),
        c.compact(),
        c.qr_payload(),
        "  " + text.replace("-", " ") + "\n",
        # people type 0, 1 and 8 for o, l and b (the prefix "op" itself is typed right)
        "op" + text[2:].replace("o", "0").replace("l", "1").replace("b", "8"),
    ):
        assert Code.parse(variant) == c, variant
    assert Code.parse(text, "invite") == c


def test_every_single_typing_mistake_is_caught() -> None:
    c = code()
    raw = c.compact()
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    for i in range(4, len(raw)):
        wrong = alphabet[(alphabet.index(raw[i]) + 1) % 32]
        typo = raw[:i] + wrong + raw[i + 1 :]
        with pytest.raises(BadCode, match="typing mistake"):
            Code.parse(typo)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hello", "not an onionpost code"),
        ("opx1aaaa", "not an onionpost invite or pairing code"),
        ("opi2" + "a" * 76, "newer version"),
        ("opi1" + "a" * 20, "should have 80"),
    ],
)
def test_what_is_wrong_with_a_code_is_said(text: str, message: str) -> None:
    with pytest.raises(BadCode, match=message):
        Code.parse(text)


def test_the_wrong_kind_of_code_says_which_command_to_use() -> None:
    with pytest.raises(BadCode, match="init --invite"):
        Code.parse(code("invite").text(), "pairing")
    with pytest.raises(BadCode, match="init --join"):
        Code.parse(code("pairing").text(), "invite")


def test_claim_and_slot_are_bound_to_the_secret_and_the_inbox() -> None:
    a, b = code(seed=b"a"), code(seed=b"b")
    assert a.claim() != b.claim() and a.slot() != b.slot()
    other = Code(a.kind, ServerSecrets.generate(NOW, rng=SeededRandom(b"x")).onion_pk, a.secret)
    assert other.claim() != a.claim() and len(a.slot()) == 16


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120))
def test_parsing_any_text_raises_only_bad_code(text: str) -> None:
    with contextlib.suppress(BadCode):
        Code.parse(text)


def _exchange(rng: SeededRandom) -> tuple[Code, Offer, Joiner, JoinRequest]:
    c = Code.generate("pairing", ONION, rng=rng)
    offer = Offer.create(c, rng=rng)
    joiner = Joiner.create(c, offer.public, rng=rng)
    dev = DeviceSecrets.generate("tablet", NOW, rng=rng)
    request = JoinRequest(dev.device_id, dev.dsk_pk, "tablet", dev.signed_prekey(), True)
    return c, offer, joiner, request


def test_a_pairing_round_trip() -> None:
    rng = SeededRandom(b"round trip")
    _, offer, joiner, request = _exchange(rng)
    box = joiner.seal_request(request, rng=rng)
    assert offer.open_request(joiner.public, box) == request
    bob = make_user("bob", 1, rng)
    grant = JoinGrant(
        bob.local, bob.binding.mailbox_id, bytes(32), bob.binding, bob.device_list, None, NOW
    )
    assert joiner.open_grant(offer.seal_grant(joiner.public, grant, rng=rng)) == grant


def test_without_the_secret_nothing_opens() -> None:
    """An inbox that knows the slot but not the secret, relaying or substituting keys."""
    rng = SeededRandom(b"mitm")
    c, offer, joiner, request = _exchange(rng)
    box = joiner.seal_request(request, rng=rng)
    guess = Code(c.kind, c.onion_pk, bytes(10))
    wrong_offer = Offer(guess, offer.secret_key)
    with pytest.raises(PairingFailed, match="not sealed with this code"):
        wrong_offer.open_request(joiner.public, box)
    # the inbox swaps in its own key: the request no longer opens
    mallory = Offer.create(c, rng=rng)
    with pytest.raises(PairingFailed):
        mallory.open_request(joiner.public, box)
    # a flipped bit anywhere
    for i in range(0, len(box), 7):
        tampered = box[:i] + bytes([box[i] ^ 1]) + box[i + 1 :]
        with pytest.raises(PairingFailed):
            offer.open_request(joiner.public, tampered)
    with pytest.raises(PairingFailed, match="too short"):
        offer.open_request(joiner.public, b"short")


def test_a_join_request_must_prove_its_own_prekey() -> None:
    rng = SeededRandom(b"prekey")
    _, _, _, request = _exchange(rng)
    other = DeviceSecrets.generate("other", NOW, rng=rng)
    forged = JoinRequest(request.device_id, other.dsk_pk, "x", request.prekey, False)
    with pytest.raises(Exception, match=r"signature|prekey"):
        JoinRequest.parse(forged.encode())
    with pytest.raises(MalformedData):
        JoinRequest.parse(request.encode() + b"\x00")
