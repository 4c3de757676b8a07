"""Key bundle verification: what a sender trusts before it encrypts to someone."""

from __future__ import annotations

import copy
import io
from dataclasses import replace

import pytest

from onionpost.core.crypto.bundle import (
    MAX_BUNDLE_BYTES,
    AntiSpamPolicy,
    KeyBundle,
    Pin,
    VerifiedBundle,
    verify_bundle,
)
from onionpost.core.crypto.envelope import StanzaTarget, seal_inner
from onionpost.core.crypto.keys import Profile, SignedPrekey
from onionpost.core.crypto.primitives import SeededRandom
from onionpost.core.errors import (
    BadSignature,
    BindingMismatch,
    DeviceListRollback,
    IdentityKeyChanged,
    KeyBundleError,
    MalformedData,
    NoStanzaForDevice,
    PrekeyExpired,
    RotationChainBroken,
    RotationChainForked,
)
from tests.unit.crypto_world import DAY, NOW, User, make_user, open_l2


def _verify(
    user: User,
    bundle: KeyBundle | None = None,
    *,
    now: int = NOW,
    pin: Pin | None = None,
    grace: int = 0,
    onion_pk: bytes | None = None,
    local: str | None = None,
) -> VerifiedBundle:
    data = (bundle or user.bundle()).encode()
    return verify_bundle(
        KeyBundle.parse(data),
        onion_pk=user.onion_pk if onion_pk is None else onion_pk,
        local=user.local if local is None else local,
        now=now,
        pin=pin,
        prekey_grace=grace,
    )


def _bob(seed: bytes, n: int = 3, *, profile: bool = False) -> tuple[SeededRandom, User]:
    rng = SeededRandom(seed)
    return rng, make_user("bob", n, rng, profile=profile)


def test_valid_bundle() -> None:
    _, bob = _bob(b"valid", profile=True)
    vb = _verify(bob)
    assert vb.uik_pk == bob.uik_pk
    assert vb.onion_pk == bob.onion_pk
    assert vb.mailbox_id == bob.mailbox_id
    assert (vb.sek_id, vb.sek_pk) == (bob.binding.sek_id, bob.binding.sek_pk)
    assert [d.device_id for d in vb.devices] == [d.device_id for d in bob.devices]
    for d, dev in zip(vb.devices, bob.devices, strict=True):
        assert d.spk_id == dev.current_prekey().spk_id
        assert d.dsk_pk == dev.dsk_pk
        assert vb.signing_key(d.device_id, 0) == dev.dsk_pk
    assert vb.skipped == {}
    assert vb.profile == bob.profile
    assert vb.pin.device_list_version == 1
    # and the pin it returns accepts the same bundle again
    assert _verify(bob, pin=vb.pin).pin == vb.pin


def test_bundle_encoding_round_trips_and_is_bounded() -> None:
    _, bob = _bob(b"enc", profile=True)
    b = bob.bundle()
    assert KeyBundle.parse(b.encode()) == b
    with pytest.raises(MalformedData):
        KeyBundle.parse(b"\x00" * (MAX_BUNDLE_BYTES + 1))
    with pytest.raises(MalformedData):
        KeyBundle.parse(b.encode() + b"\x00")
    bad_policy = replace(b, policy=AntiSpamPolicy(41, True, 1))
    with pytest.raises(MalformedData):
        KeyBundle.parse(bad_policy.encode())


def test_rotations_with_the_identity_key_offline() -> None:
    """A device rotates its key several times without a new device list; senders follow the
    chain from the key the device list names to the newest one."""
    rng, bob = _bob(b"rot")
    dev = bob.devices[0]
    keys_seen = [dev.dsk_pk]
    for i in range(4):
        dev.rotate_signing_key(NOW + i, rng=rng)
        keys_seen.append(dev.dsk_pk)
    vb = _verify(bob)
    d = next(x for x in vb.devices if x.device_id == dev.device_id)
    assert (d.dsk_seq, d.dsk_pk) == (4, dev.dsk_pk)
    assert [vb.signing_key(dev.device_id, s) for s in range(5)] == keys_seen
    # the UIK later catches up: the device list names seq 4 directly
    bob.resign_device_list(NOW + DAY)
    assert _verify(bob, pin=vb.pin).devices[0].dsk_seq == 4


def test_device_list_key_not_in_chain() -> None:
    rng, bob = _bob(b"notinchain")
    dev = bob.devices[0]
    dev.rotate_signing_key(NOW, rng=rng)
    bob.resign_device_list(NOW)  # names seq 1
    b = bob.bundle()
    del b.chains[dev.device_id]  # ... but the chain to it is missing
    with pytest.raises(RotationChainBroken):
        _verify(bob, b)


def test_prekeys_signed_by_a_rotated_away_key_are_ignored() -> None:
    rng, bob = _bob(b"oldspk", n=2)
    dev = bob.devices[0]
    old_spk = dev.signed_prekey()  # signed by key seq 0
    dev.rotate_signing_key(NOW, rng=rng)
    bundle = bob.bundle()
    only_old = replace(bundle, prekeys=(old_spk, bob.devices[1].signed_prekey()))
    vb = _verify(bob, only_old)
    assert [d.device_id for d in vb.devices] == [bob.devices[1].device_id]
    assert vb.skipped == {dev.device_id: PrekeyExpired.summary()}
    both = replace(bundle, prekeys=(old_spk, *bundle.prekeys))
    d0 = _verify(bob, both).devices[0]
    assert (d0.device_id, d0.dsk_seq) == (dev.device_id, 1)


def test_prekey_claiming_the_new_key_but_signed_by_the_old_one() -> None:
    rng, bob = _bob(b"liar")
    dev = bob.devices[0]
    old_seed = dev.dsk_seed
    dev.rotate_signing_key(NOW, rng=rng)
    spk = dev.signed_prekey()
    forged = replace(spk, signature=b"").signed(old_seed)
    # the forged prekey is ignored (one bad prekey must not sink the bundle); with no other
    # prekey for the device, nothing is left to encrypt to
    with pytest.raises(PrekeyExpired):
        _verify(bob, replace(bob.bundle(), prekeys=(forged,)))
    vb = _verify(bob, replace(bob.bundle(), prekeys=(forged, spk)))
    assert vb.devices[0].spk_id == spk.spk_id


def test_newest_prekey_wins() -> None:
    rng, bob = _bob(b"newest", n=1)
    dev = bob.devices[0]
    old = dev.signed_prekey()
    dev.new_prekey(NOW + DAY, 7 * DAY, rng=rng)
    new = dev.signed_prekey()
    vb = _verify(bob, replace(bob.bundle(), prekeys=(new, old)), now=NOW + DAY)
    assert vb.devices[0].spk_id == new.spk_id


def test_expired_prekeys_and_grace() -> None:
    _, bob = _bob(b"expiry", n=2)
    not_after = bob.devices[0].current_prekey().not_after
    assert len(_verify(bob, now=not_after).devices) == 2
    with pytest.raises(PrekeyExpired):
        _verify(bob, now=not_after + 1)
    vb = _verify(bob, now=not_after + 14 * DAY, grace=14 * DAY)
    assert len(vb.devices) == 2
    with pytest.raises(PrekeyExpired):
        _verify(bob, now=not_after + 14 * DAY + 1, grace=14 * DAY)


def test_one_expired_device_is_skipped() -> None:
    rng, bob = _bob(b"skip", n=2)
    bob.devices[1].new_prekey(NOW + 6 * DAY, 7 * DAY, rng=rng)
    vb = _verify(bob, now=NOW + 8 * DAY)
    assert [d.device_id for d in vb.devices] == [bob.devices[1].device_id]
    assert set(vb.skipped) == {bob.devices[0].device_id}


def test_binding_for_another_onion_or_user() -> None:
    rng, bob = _bob(b"binding")
    other = make_user("carol", 1, rng)
    with pytest.raises(BindingMismatch):
        _verify(bob, onion_pk=other.onion_pk)
    with pytest.raises(BindingMismatch):
        _verify(bob, local="alice")


def test_binding_and_device_list_from_different_identities() -> None:
    rng, bob = _bob(b"mixed")
    carol = make_user("bob", 1, rng)
    mixed = replace(bob.bundle(), binding=replace(carol.binding, onion_pk=bob.onion_pk))
    with pytest.raises(BadSignature):
        _verify(bob, mixed)  # carol's signature does not cover bob's onion
    resigned = (
        replace(carol.binding, onion_pk=bob.onion_pk)
        .signed(carol.identity.uik_seed)
        .countersigned(bob.server.onion_seed)
    )
    with pytest.raises(KeyBundleError) as err:
        _verify(bob, replace(bob.bundle(), binding=resigned))
    assert type(err.value) is KeyBundleError


def test_expired_binding() -> None:
    _, bob = _bob(b"oldbinding")
    with pytest.raises(KeyBundleError) as err:
        _verify(bob, now=bob.binding.not_after + 1, grace=100 * DAY)
    assert type(err.value) is KeyBundleError


def test_signatures_on_binding_device_list() -> None:
    _, bob = _bob(b"sigs", profile=True)
    b = bob.bundle()
    broken_sig = bytes(64)
    for altered in (
        replace(b, binding=replace(b.binding, signature=broken_sig)),
        replace(b, device_list=replace(b.device_list, signature=b.binding.signature)),
    ):
        with pytest.raises(BadSignature):
            _verify(bob, altered)


def test_a_valid_profile_is_returned() -> None:
    _, bob = _bob(b"goodprofile", profile=True)
    v = _verify(bob)
    assert v.profile == bob.profile
    assert v.profile_problem is None


def test_a_forged_profile_is_left_out_and_the_keys_still_verify() -> None:
    """The profile is decoration: a bad one must not stop mail, and must never be shown."""
    _, bob = _bob(b"sigs", profile=True)
    assert bob.profile is not None
    forged = replace(bob.profile, display_name="Mallory")
    v = _verify(bob, replace(bob.bundle(), profile=forged))
    assert v.profile is None
    assert v.profile_problem is not None and "signature" in v.profile_problem
    assert v.devices  # the keys are usable


def test_profile_by_another_identity_is_left_out() -> None:
    rng, bob = _bob(b"profile")
    carol = make_user("carol", 1, rng)
    prof = Profile(carol.uik_pk, NOW, "Bob").signed(carol.identity.uik_seed)
    v = _verify(bob, replace(bob.bundle(), profile=prof))
    assert v.profile is None
    assert v.profile_problem == "The profile was signed by a different identity."


# --- pins: what a sender remembers -------------------------------------------------------------


def test_identity_key_changed() -> None:
    rng, bob = _bob(b"ikc")
    pin = _verify(bob).pin
    new_bob = make_user("bob", 1, rng)
    new_bob.server = bob.server
    new_bob.binding = (
        replace(new_bob.binding, onion_pk=bob.onion_pk)
        .signed(new_bob.identity.uik_seed)
        .countersigned(bob.server.onion_seed)  # bob's inbox vouches for the new identity
    )
    _verify(new_bob)  # fine for someone who never met bob
    with pytest.raises(IdentityKeyChanged):
        _verify(new_bob, pin=pin)


def test_device_list_rollback_to_an_older_version() -> None:
    _, bob = _bob(b"rollback")
    old = bob.bundle()
    bob.resign_device_list(NOW + 1)
    pin = _verify(bob).pin
    assert pin.device_list_version == 2
    with pytest.raises(DeviceListRollback):
        _verify(bob, old, pin=pin)


def test_device_list_same_version_different_content() -> None:
    _, bob = _bob(b"equivocate")
    pin = _verify(bob).pin
    other = replace(bob.device_list, issued_at=NOW + 5).signed(bob.identity.uik_seed)
    with pytest.raises(DeviceListRollback):
        _verify(bob, replace(bob.bundle(), device_list=other), pin=pin)


def test_pinned_chain_head_is_contradicted() -> None:
    """A sender saw key seq 2; the inbox now serves a history where seq 2 is another key."""
    rng, bob = _bob(b"pinfork")
    dev = bob.devices[0]
    dev.rotate_signing_key(NOW, rng=rng)
    thief = copy.deepcopy(dev)
    dev.rotate_signing_key(NOW + 1, rng=rng)
    pin = _verify(bob).pin
    thief.rotate_signing_key(NOW + 2, rng=SeededRandom(b"thief"))
    thief.rotate_signing_key(NOW + 3, rng=SeededRandom(b"thief"))
    forked = replace(
        bob.bundle(), chains={**bob.bundle().chains, dev.device_id: tuple(thief.chain)}
    )
    forked = replace(
        forked,
        prekeys=(
            *(p for p in forked.prekeys if p.device_id != dev.device_id),
            thief.signed_prekey(),
        ),
    )
    _verify(bob, forked)  # a first-time sender cannot tell
    with pytest.raises(RotationChainForked):
        _verify(bob, forked, pin=pin)
    # serving both histories at once is a fork even without a pin
    both = replace(forked, chains={dev.device_id: (*dev.chain, thief.chain[1], thief.chain[2])})
    with pytest.raises(RotationChainForked):
        _verify(bob, both)


def test_pinned_chain_head_rolled_back() -> None:
    rng, bob = _bob(b"headback")
    dev = bob.devices[0]
    before = copy.deepcopy(dev)
    before.rotate_signing_key(NOW, rng=SeededRandom(b"same"))
    dev.rotate_signing_key(NOW, rng=SeededRandom(b"same"))
    dev.rotate_signing_key(NOW + 1, rng=rng)
    pin = _verify(bob).pin
    assert pin.heads[dev.device_id].seq == 2
    stale = replace(
        bob.bundle(),
        chains={dev.device_id: tuple(before.chain)},
        prekeys=(before.signed_prekey(), *(d.signed_prekey() for d in bob.devices[1:])),
    )
    with pytest.raises(RotationChainBroken):
        _verify(bob, stale, pin=pin)


def test_pinned_genesis_contradicted() -> None:
    rng, bob = _bob(b"genesis")
    pin = _verify(bob).pin
    dev = bob.devices[0]
    impostor = copy.deepcopy(dev)
    impostor.dsk_seed = rng(32)
    impostor.genesis_pk = impostor.dsk_pk
    impostor.rotate_signing_key(NOW, rng=rng)
    bob.devices[0] = impostor
    bob.resign_device_list(NOW + 1)  # the (stolen) UIK vouches for it
    with pytest.raises(RotationChainForked):
        _verify(bob, pin=pin)


# --- revocation ----------------------------------------------------------------------------------


def test_revoked_device_gets_nothing() -> None:
    rng, bob = _bob(b"revoke", n=3)
    alice = make_user("alice", 1, rng)
    pin = _verify(bob).pin
    lost = copy.deepcopy(bob)  # what the thief keeps: device 1's secrets
    revoked_id = bob.devices[1].device_id
    bob.resign_device_list(NOW + 1, revoked=[revoked_id])
    stale = replace(
        bob.bundle(), prekeys=tuple(d.signed_prekey() for d in lost.devices)
    )  # the inbox still has the revoked device's prekey: it must be ignored
    vb = _verify(bob, stale, pin=pin)
    assert revoked_id not in {d.device_id for d in vb.devices}
    assert vb.device_list.is_revoked(revoked_id)
    sink = io.BytesIO()
    seal_inner(
        sender=alice.sender(),
        targets=[StanzaTarget(d.spk_id, d.spk_pk) for d in vb.devices],
        recipient_uiks=[vb.uik_pk],
        body=b"after revocation",
        created_at=NOW + 2,
        expires_at=NOW + DAY,
        sink=sink,
        rng=rng,
    )
    l2 = sink.getvalue()
    with pytest.raises(NoStanzaForDevice):
        open_l2(l2, lost, 1, now=NOW + 2)
    for i in range(len(bob.devices)):
        assert open_l2(l2, bob, i, now=NOW + 2)[1] == b"after revocation"


def test_device_vanishing_without_a_new_version_is_rollback() -> None:
    _, bob = _bob(b"vanish")
    pin = _verify(bob).pin
    fewer = replace(bob.device_list, devices=bob.device_list.devices[:2]).signed(
        bob.identity.uik_seed
    )
    with pytest.raises(DeviceListRollback):
        _verify(bob, replace(bob.bundle(), device_list=fewer), pin=pin)


def test_prekeys_for_unknown_devices_are_ignored() -> None:
    rng, bob = _bob(b"unknown", n=1)
    stranger = make_user("x", 1, rng).devices[0]
    b = bob.bundle()
    vb = _verify(bob, replace(b, prekeys=(*b.prekeys, stranger.signed_prekey())))
    assert len(vb.devices) == 1


def test_prekey_parse_round_trip() -> None:
    _, bob = _bob(b"spk")
    spk = bob.devices[0].signed_prekey()
    assert SignedPrekey.parse(spk.encode()) == spk
