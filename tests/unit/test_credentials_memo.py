"""The memo of verified sender credentials (``sender.checked_credentials``): byte-identical
credentials are verified once, and nothing the memo holds lets a message through that the
full checks would refuse (see docs/threat-model.md, "Remembered checks")."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest

from onionpost.core.crypto import keys, sender
from onionpost.core.crypto.keys import DeviceList
from onionpost.core.crypto.sender import (
    EXT_SENDER_KEYS,
    MEMO_BYTES,
    checked_credentials,
    verify_sender,
)
from onionpost.core.errors import BadSignature, IdentityKeyChanged, KeyBundleError
from tests.unit.crypto_world import NOW, make_user
from tests.unit.test_crypto_sender import _creds, _header, _setup


@pytest.fixture(autouse=True)
def _empty_memo() -> Iterator[None]:
    sender._checked_credentials_memo.cache_clear()
    yield
    sender._checked_credentials_memo.cache_clear()


@pytest.fixture
def signatures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Ed25519 verification made through the key objects, by what it checked (the real
    check still runs: this only counts)."""
    seen: list[str] = []
    real = keys.ed25519_verify

    def counting(public: bytes, message: bytes, signature: bytes, what: str) -> None:
        seen.append(what)
        real(public, message, signature, what)

    monkeypatch.setattr(keys, "ed25519_verify", counting)
    return seen


def test_identical_credentials_are_verified_once(signatures: list[str]) -> None:
    rng, alice, bob = _setup(b"memo")
    first = _header(alice, bob, rng)
    second = _header(alice, bob, rng)  # another message, the same credentials
    blob = first.extension(EXT_SENDER_KEYS)
    assert blob is not None and blob == second.extension(EXT_SENDER_KEYS)
    v1 = verify_sender(first, blob, None)
    assert len(signatures) == 3  # the binding (UIK + inbox) and the device list
    v2 = verify_sender(second, bytes(blob), v1.pin)  # a new bytes object, equal bytes
    assert len(signatures) == 3
    assert v2.uik_pk == alice.uik_pk and not v2.first_contact
    assert checked_credentials(blob) is checked_credentials(bytes(blob))


def test_a_changed_byte_is_checked_afresh_and_refused(signatures: list[str]) -> None:
    rng, alice, bob = _setup(b"flip")
    h = _header(alice, bob, rng)
    blob = h.extension(EXT_SENDER_KEYS)
    assert blob is not None
    verify_sender(h, blob, None)
    # the device list's signature is the last 64 bytes before the (empty) chain count
    tampered = bytearray(blob)
    tampered[-3] ^= 1
    with pytest.raises(BadSignature):
        checked_credentials(bytes(tampered))
    with pytest.raises(BadSignature):  # a failure is never remembered as a success either
        checked_credentials(bytes(tampered))
    assert sender._checked_credentials_memo.cache_info().currsize == 1


def test_a_failure_is_not_remembered(signatures: list[str]) -> None:
    _rng, alice, _bob = _setup(b"fail")
    forged = copy.deepcopy(alice)
    forged.device_list = DeviceList(
        alice.uik_pk, alice.device_list.version, NOW, alice.device_list.devices, (), bytes(64)
    )
    blob = _creds(forged)
    for _ in range(2):
        with pytest.raises(BadSignature):
            checked_credentials(blob)
    assert sender._checked_credentials_memo.cache_info().currsize == 0


def test_remembered_credentials_still_meet_every_check_against_the_message() -> None:
    """The memo answers for the blob alone: a message it does not fit, a pin of another
    identity or a revoked device are refused as without it."""
    rng, alice, bob = _setup(b"context")
    carol = make_user("carol", 1, rng)
    h = _header(alice, bob, rng)
    blob = h.extension(EXT_SENDER_KEYS)
    assert blob is not None
    verify_sender(h, blob, None)  # remembered now
    with pytest.raises(IdentityKeyChanged):
        verify_sender(h, blob, carol.verified().pin)
    carols = _header(carol, bob, rng)
    with pytest.raises(KeyBundleError):  # alice's credentials on carol's message
        verify_sender(carols, blob, None)
    lost = alice.devices[0]
    alice.resign_device_list(NOW - 1, revoked=[lost.device_id])
    with pytest.raises(KeyBundleError, match="revoked"):
        verify_sender(h, blob, None, alice.device_list)


def test_large_credentials_are_not_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    rng, alice, bob = _setup(b"large")
    h = _header(alice, bob, rng)
    blob = h.extension(EXT_SENDER_KEYS)
    assert blob is not None and len(blob) <= MEMO_BYTES
    checked_credentials(blob)
    assert sender._checked_credentials_memo.cache_info().currsize == 1
    sender._checked_credentials_memo.cache_clear()
    monkeypatch.setattr(sender, "MEMO_BYTES", len(blob) - 1)  # as if it were over the bound
    assert checked_credentials(blob).binding.uik_pk == alice.uik_pk
    assert sender._checked_credentials_memo.cache_info().currsize == 0
