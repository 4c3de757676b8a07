"""Offline proof of who sent a message (``onionpost.core.crypto.sender``)."""

from __future__ import annotations

import copy
import io

import pytest

from onionpost.core.crypto.envelope import ContentHeader, seal_inner
from onionpost.core.crypto.keys import ServerBinding
from onionpost.core.crypto.primitives import SeededRandom
from onionpost.core.crypto.sender import (
    EXT_SENDER_KEYS,
    SenderCredentials,
    pin_encode,
    pin_parse,
    verify_sender,
)
from onionpost.core.errors import (
    BadSignature,
    BindingMismatch,
    IdentityKeyChanged,
    KeyBundleError,
    MalformedData,
    RotationChainForked,
)
from tests.unit.crypto_world import DAY, NOW, User, make_user, open_l2


def _creds(user: User, device: int = 0) -> bytes:
    dev = user.devices[device]
    return SenderCredentials(user.binding, user.device_list, tuple(dev.chain)).encode()


def _header(
    sender: User,
    reader: User,
    rng: SeededRandom,
    *,
    creds: bytes | None = None,
    created_at: int = NOW,
    device: int = 0,
) -> ContentHeader:
    sink = io.BytesIO()
    ext = ((EXT_SENDER_KEYS, creds or _creds(sender, device)),)
    seal_inner(
        sender=sender.sender(device),
        targets=reader.targets(),
        recipient_uiks=[reader.uik_pk],
        body=b"hello",
        created_at=created_at,
        expires_at=created_at + DAY,
        sink=sink,
        extensions=ext,
        rng=rng,
    )
    return open_l2(sink.getvalue(), reader, 0, now=created_at)[0].header


def _setup(seed: bytes) -> tuple[SeededRandom, User, User]:
    rng = SeededRandom(seed)
    return rng, make_user("alice", 2, rng), make_user("bob", 1, rng)


def test_first_contact_then_pinned() -> None:
    rng, alice, bob = _setup(b"first")
    h = _header(alice, bob, rng)
    v = verify_sender(h, h.extension(EXT_SENDER_KEYS), None)
    assert (v.address_local, v.onion_pk, v.uik_pk) == ("alice", alice.onion_pk, alice.uik_pk)
    assert v.first_contact
    assert v.device_id == alice.devices[0].device_id
    v2 = verify_sender(h, h.extension(EXT_SENDER_KEYS), v.pin)
    assert not v2.first_contact
    assert pin_parse(pin_encode(v2.pin)) == v2.pin


def test_pin_from_bundle_accepts_messages_after_rotation() -> None:
    rng, alice, bob = _setup(b"rotate")
    pin = alice.verified().pin
    alice.devices[0].rotate_signing_key(NOW, rng=rng)
    h = _header(alice, bob, rng)
    v = verify_sender(h, h.extension(EXT_SENDER_KEYS), pin)
    assert v.pin.heads[alice.devices[0].device_id].seq == 1


def test_missing_or_foreign_credentials() -> None:
    rng, alice, bob = _setup(b"missing")
    carol = make_user("carol", 1, rng)
    h = _header(alice, bob, rng)
    with pytest.raises(KeyBundleError):
        verify_sender(h, None, None)
    with pytest.raises(KeyBundleError):
        verify_sender(h, _creds(carol), None)
    with pytest.raises(MalformedData):
        verify_sender(h, b"junk", None)


def test_identity_key_changed() -> None:
    rng, alice, bob = _setup(b"ikc")
    carol = make_user("carol", 1, rng)
    h = _header(alice, bob, rng)
    with pytest.raises(IdentityKeyChanged):
        verify_sender(h, h.extension(EXT_SENDER_KEYS), carol.verified().pin)


def test_binding_for_another_onion() -> None:
    rng, alice, bob = _setup(b"onion")
    moved = copy.deepcopy(alice)
    # even an inbox that countersigned (bob's, here) does not make the binding fit alice's address
    moved.binding = (
        ServerBinding(
            alice.uik_pk,
            bob.onion_pk,
            alice.mailbox_id,
            "alice",
            alice.binding.sek_id,
            alice.binding.sek_pk,
            NOW,
            NOW + DAY,
        )
        .signed(alice.identity.uik_seed)
        .countersigned(bob.server.onion_seed)
    )
    h = _header(alice, bob, rng, creds=_creds(moved))
    with pytest.raises(BindingMismatch):
        verify_sender(h, h.extension(EXT_SENDER_KEYS), None)


def test_device_not_on_the_list_and_revoked_devices() -> None:
    rng, alice, bob = _setup(b"revoked")
    lost = alice.devices[1]
    h_before = _header(alice, bob, rng, device=1, created_at=NOW)
    old_creds = _creds(alice, 1)
    alice.resign_device_list(NOW + DAY, revoked=[lost.device_id])
    known = alice.device_list
    # credentials from after the revocation do not name the device
    with pytest.raises(KeyBundleError):
        verify_sender(h_before, _creds(alice), None)
    # a message written after the revocation, carrying the old list, is refused
    thief = copy.deepcopy(alice)
    thief.devices.append(lost)
    h_after = _header(
        thief, bob, rng, device=len(thief.devices) - 1, creds=old_creds, created_at=NOW + 2 * DAY
    )
    with pytest.raises(KeyBundleError, match="revoked"):
        verify_sender(h_after, old_creds, None, known)
    # mail written before the revocation still verifies
    verify_sender(h_before, old_creds, None, known)


def test_forked_device_key_against_pin() -> None:
    rng, alice, bob = _setup(b"fork")
    dev = alice.devices[0]
    thief = copy.deepcopy(alice)
    dev.rotate_signing_key(NOW, rng=rng)
    pin = alice.verified().pin
    thief.devices[0].rotate_signing_key(NOW, rng=SeededRandom(b"thief"))
    h = _header(thief, bob, rng, creds=_creds(thief))
    with pytest.raises(RotationChainForked):
        verify_sender(h, h.extension(EXT_SENDER_KEYS), pin)


def test_credentials_with_a_bad_signature() -> None:
    rng, alice, bob = _setup(b"sig")
    forged = copy.deepcopy(alice)
    forged.binding = ServerBinding(
        alice.uik_pk,
        alice.onion_pk,
        bytes(16),
        "alice",
        1,
        bytes(32),
        NOW,
        NOW + DAY,
        bytes(64),
        bytes(64),
    )
    h = _header(alice, bob, rng, creds=_creds(forged))
    with pytest.raises(BadSignature):
        verify_sender(h, h.extension(EXT_SENDER_KEYS), None)


def test_first_contact_cannot_be_claimed_for_someone_elses_address() -> None:
    """Mallory binds her own identity key to Alice's onion and signs mail as alice@onion.
    A recipient who has never met Alice must not get a verified sender out of that."""
    rng, alice, bob = _setup(b"spoof")
    mallory = make_user("mallory", 1, rng)
    mallory.local = "alice"
    mallory.server = alice.server
    claim = ServerBinding(
        mallory.uik_pk,
        alice.onion_pk,
        alice.mailbox_id,
        "alice",
        alice.binding.sek_id,
        alice.binding.sek_pk,
        NOW,
        NOW + DAY,
    ).signed(mallory.identity.uik_seed)
    # Mallory cannot countersign with Alice's onion key; neither nothing nor her own key works
    malloryland = make_user("mallory", 1, rng).server  # an inbox Mallory really controls
    for attempt in (claim, claim.countersigned(malloryland.onion_seed)):
        mallory.binding = attempt
        h = _header(mallory, bob, rng)
        assert (h.sender_local, h.sender_onion_pk) == ("alice", alice.onion_pk)
        with pytest.raises(BadSignature):
            verify_sender(h, h.extension(EXT_SENDER_KEYS), None)
