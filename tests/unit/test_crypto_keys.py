"""Signed key records, private key files, and device key rotation chains."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from onionpost.core.crypto import keys
from onionpost.core.crypto.keys import (
    DeviceList,
    DeviceSecrets,
    IdentitySecrets,
    Profile,
    RevokedDevice,
    RotationRecord,
    ServerBinding,
    ServerSecrets,
    SignedPrekey,
    genesis_hash,
    verify_chain,
)
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public, x25519_public
from onionpost.core.errors import (
    BadSignature,
    MalformedData,
    RotationChainBroken,
    RotationChainForked,
)
from tests.unit.crypto_world import DAY, NOW, make_user


def _device(seed: bytes = b"dev", rotations: int = 0) -> tuple[SeededRandom, DeviceSecrets]:
    rng = SeededRandom(seed)
    dev = DeviceSecrets.generate("laptop", NOW, rng=rng)
    for i in range(rotations):
        dev.rotate_signing_key(NOW + i, rng=rng)
    return rng, dev


# --- encodings round-trip and are canonical ----------------------------------------------------


def test_every_record_round_trips() -> None:
    rng = SeededRandom(b"records")
    user = make_user("alice", 2, rng, profile=True)
    dev = user.devices[0]
    dev.rotate_signing_key(NOW, rng=rng)
    user.resign_device_list(NOW, revoked=[user.devices[1].device_id])
    records: list[tuple[Any, Any]] = [
        (DeviceList, user.device_list),
        (RotationRecord, dev.chain[0]),
        (SignedPrekey, dev.signed_prekey()),
        (ServerBinding, user.binding),
        (Profile, user.profile),
    ]
    for cls, rec in records:
        data = rec.encode()
        back = cls.parse(data)
        assert back == rec
        assert back.encode() == data


def test_key_files_round_trip() -> None:
    rng, dev = _device(b"files", rotations=3)
    dev.new_prekey(NOW + DAY, 7 * DAY, rng=rng)
    back = DeviceSecrets.parse(dev.encode())
    assert back == dev
    assert back.dsk_pk == dev.dsk_pk
    ident = IdentitySecrets.generate("alice", NOW, rng=rng)
    assert IdentitySecrets.parse(ident.encode()) == ident
    server = ServerSecrets.generate(NOW, rng=rng)
    server.new_server_key(NOW + DAY, rng=rng)
    assert ServerSecrets.parse(server.encode()) == server


def test_key_files_reject_trailing_bytes_and_wrong_type() -> None:
    rng, dev = _device(b"strict")
    ident = IdentitySecrets.generate("alice", NOW, rng=rng)
    for parse, data in (
        (DeviceSecrets.parse, dev.encode()),
        (IdentitySecrets.parse, ident.encode()),
        (ServerSecrets.parse, ServerSecrets.generate(NOW, rng=rng).encode()),
    ):
        with pytest.raises(MalformedData):
            parse(data + b"\x00")
        with pytest.raises(MalformedData):
            parse(b"XXXX" + data[4:])
    with pytest.raises(MalformedData):
        DeviceSecrets.parse(ident.encode())


def test_signature_contexts_do_not_cross() -> None:
    """A UIK signature on a device list never verifies as a binding or a profile, even when
    the bytes are made to line up: every signature starts with its own context string."""
    rng = SeededRandom(b"ctx")
    user = make_user("alice", 1, rng, profile=True)
    sig = user.device_list.signature
    with pytest.raises(BadSignature):
        replace(user.binding, signature=sig).verify()
    assert user.profile is not None
    with pytest.raises(BadSignature):
        replace(user.profile, signature=sig).verify()
    prefixes = [
        keys.CTX_DEVICE_LIST,
        keys.CTX_ROTATION,
        keys.CTX_PREKEY,
        keys.CTX_BINDING,
        keys.CTX_PROFILE,
    ]
    for a in prefixes:
        assert a.endswith(b"\x00")
        assert all(a == b or not b.startswith(a) for b in prefixes)


def test_signed_records_detect_any_change() -> None:
    rng = SeededRandom(b"change")
    user = make_user("alice", 1, rng, profile=True)
    assert user.profile is not None
    dev = user.devices[0]
    spk = dev.signed_prekey()

    def self_signed(r: Any) -> None:
        r.verify()

    def by_device(r: Any) -> None:
        r.verify(dev.dsk_pk)

    checks: list[tuple[Any, Callable[[Any], None]]] = [
        (user.device_list, self_signed),
        (user.binding, self_signed),
        (user.profile, self_signed),
        (spk, by_device),
    ]
    for rec, verify in checks:
        verify(rec)
        body_len = len(rec.encode()) - 64
        # Every flip must be caught, by the parser or by the signature; and the signature check
        # must be what catches some of them, or this test would pass with no verification.
        caught: dict[str, int] = {"parser": 0, "signature": 0}
        for at in range(4, body_len, 7):
            data = bytearray(rec.encode())
            data[at] ^= 0x01
            try:
                altered = type(rec).parse(bytes(data))
            except MalformedData:
                caught["parser"] += 1  # a change that breaks the structure is refused early
                continue
            with pytest.raises(BadSignature):
                verify(altered)
            caught["signature"] += 1
        assert caught["signature"] > 0, (type(rec).__name__, caught)


def test_device_list_structure_rules() -> None:
    rng = SeededRandom(b"dlrules")
    user = make_user("alice", 2, rng)
    dl = user.device_list
    twice = replace(dl, devices=(dl.devices[0], dl.devices[0])).signed(user.identity.uik_seed)
    with pytest.raises(MalformedData):
        DeviceList.parse(twice.encode())
    both = replace(dl, revoked=(RevokedDevice(dl.devices[0].device_id, NOW),)).signed(
        user.identity.uik_seed
    )
    with pytest.raises(MalformedData):
        DeviceList.parse(both.encode())
    bad_name = replace(dl, devices=(replace(dl.devices[0], name="a\r\nb"),))
    with pytest.raises(MalformedData):
        DeviceList.parse(bad_name.signed(user.identity.uik_seed).encode())


def test_torsion_keys_are_refused_in_records() -> None:
    rng = SeededRandom(b"torsion")
    user = make_user("alice", 1, rng)
    order8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    bad = replace(user.device_list, uik_pk=order8)
    with pytest.raises(MalformedData):
        DeviceList.parse(bad.body() + bytes(64))
    with pytest.raises(MalformedData):
        ServerBinding.parse(replace(user.binding, uik_pk=order8).body() + bytes(64))


def test_prekeys_rotate_and_retire() -> None:
    rng, dev = _device(b"prekeys")
    first = dev.current_prekey()
    second = dev.new_prekey(NOW + 7 * DAY, 7 * DAY, rng=rng)
    assert dev.current_prekey() == second
    assert [p.retired_at for p in dev.prekeys] == [NOW + 7 * DAY, 0]
    assert dev.drop_retired_prekeys(NOW + 7 * DAY + 59 * DAY, 60 * DAY) == 0
    assert dev.drop_retired_prekeys(NOW + 7 * DAY + 60 * DAY, 60 * DAY) == 1
    assert [p.spk_id for p in dev.prekeys] == [second.spk_id]
    assert first.spk_id != second.spk_id
    spk = dev.signed_prekey()
    assert spk.spk_pk == x25519_public(second.secret)
    spk.verify(dev.dsk_pk)


# --- rotation chains -------------------------------------------------------------------------


def test_chain_of_several_rotations() -> None:
    _, dev = _device(b"chain", rotations=5)
    head, keyring = verify_chain(dev.device_id, tuple(dev.chain))
    assert head.seq == 5
    assert head.pk == dev.dsk_pk
    assert head.genesis_pk == dev.genesis_pk
    assert keyring[0] == dev.genesis_pk
    assert [keyring[i] for i in range(1, 6)] == [r.new_pk for r in dev.chain]
    # order of delivery does not matter; exact duplicates are harmless
    shuffled = (dev.chain[3], dev.chain[0], dev.chain[4], dev.chain[1], dev.chain[2], dev.chain[0])
    assert verify_chain(dev.device_id, shuffled)[0] == head
    # the genesis key pinned from an earlier fetch matches
    assert verify_chain(dev.device_id, tuple(dev.chain), dev.genesis_pk)[0] == head


def test_chain_empty() -> None:
    _, dev = _device(b"empty")
    head, keyring = verify_chain(dev.device_id, (), dev.dsk_pk)
    assert (head.seq, head.pk, keyring) == (0, dev.dsk_pk, {0: dev.dsk_pk})
    with pytest.raises(RotationChainBroken):
        verify_chain(dev.device_id, ())


def test_chain_with_a_gap() -> None:
    _, dev = _device(b"gap", rotations=3)
    with pytest.raises(RotationChainBroken):
        verify_chain(dev.device_id, (dev.chain[0], dev.chain[2]))
    with pytest.raises(RotationChainBroken):
        verify_chain(dev.device_id, (dev.chain[1], dev.chain[2]))  # seq 1 missing


def test_chain_bad_link_old_key() -> None:
    rng, dev = _device(b"badlink", rotations=2)
    stranger = rng(32)
    new = rng(32)
    rec = RotationRecord(
        dev.device_id, 2, ed25519_public(stranger), ed25519_public(new), dev.chain[0].digest(), NOW
    ).signed(stranger, new)
    with pytest.raises(RotationChainBroken):
        verify_chain(dev.device_id, (dev.chain[0], rec))


def test_chain_bad_link_prev_hash() -> None:
    """Signed by the right old key, but pointing back at the wrong record."""
    rng, dev = _device(b"badprev", rotations=1)
    new = rng(32)
    rec = RotationRecord(
        dev.device_id,
        2,
        dev.dsk_pk,
        ed25519_public(new),
        genesis_hash(dev.device_id, dev.genesis_pk),  # should be dev.chain[0].digest()
        NOW,
    ).signed(dev.dsk_seed, new)
    with pytest.raises(RotationChainBroken):
        verify_chain(dev.device_id, (dev.chain[0], rec))
    first = replace(dev.chain[0], prev_hash=bytes(32))
    old = SeededRandom(b"badprev")(32)  # the generating rng's first draw: the seed
    assert ed25519_public(old) == dev.genesis_pk
    with pytest.raises(RotationChainBroken):
        verify_chain(dev.device_id, (first.signed(old, dev.dsk_seed),))


def test_chain_bad_signature_by_old_key() -> None:
    _, dev = _device(b"badold", rotations=2)
    rec = dev.chain[1]
    bad = replace(rec, sig_old=dev.chain[0].sig_old)
    with pytest.raises(BadSignature, match="old key"):
        verify_chain(dev.device_id, (dev.chain[0], bad))


def test_chain_bad_signature_by_new_key() -> None:
    _, dev = _device(b"badnew", rotations=2)
    rec = dev.chain[1]
    sig = bytearray(rec.sig_new)
    sig[10] ^= 1
    with pytest.raises(BadSignature, match="new key"):
        verify_chain(dev.device_id, (dev.chain[0], replace(rec, sig_new=bytes(sig))))


def test_rotation_needs_the_new_key_too() -> None:
    """Someone holding only the old key cannot rotate a device onto a key it does not hold."""
    rng, dev = _device(b"possession")
    victim_pk = ed25519_public(rng(32))
    rec = RotationRecord(
        dev.device_id, 1, dev.dsk_pk, victim_pk, genesis_hash(dev.device_id, dev.dsk_pk), NOW
    )
    signed_by_old_only = rec.signed(dev.dsk_seed, dev.dsk_seed)
    with pytest.raises(BadSignature, match="new key"):
        verify_chain(dev.device_id, (signed_by_old_only,))


def test_chain_record_of_another_device() -> None:
    _, dev = _device(b"other", rotations=1)
    _, other = _device(b"other2", rotations=1)
    with pytest.raises(RotationChainBroken):
        verify_chain(dev.device_id, (other.chain[0],))


def test_chain_forked_by_a_thief() -> None:
    """Two validly linked successors of one key: whoever made the second held the key."""
    rng, dev = _device(b"fork", rotations=2)
    thief = copy.deepcopy(dev)
    dev.rotate_signing_key(NOW + 10, rng=rng)
    thief.rotate_signing_key(NOW + 11, rng=SeededRandom(b"thief"))
    assert dev.chain[2] != thief.chain[2]
    with pytest.raises(RotationChainForked):
        verify_chain(dev.device_id, (*dev.chain, thief.chain[2]))


def test_chain_forked_at_the_first_rotation() -> None:
    rng, dev = _device(b"fork1")
    thief = copy.deepcopy(dev)
    dev.rotate_signing_key(NOW, rng=rng)
    thief.rotate_signing_key(NOW, rng=SeededRandom(b"thief"))
    with pytest.raises(RotationChainForked):
        verify_chain(dev.device_id, (dev.chain[0], thief.chain[0]))


def test_chain_that_contradicts_the_pinned_first_key() -> None:
    _, dev = _device(b"pinfork", rotations=2)
    rng, impostor = _device(b"impostor")
    impostor.device_id = dev.device_id
    impostor.rotate_signing_key(NOW, rng=rng)
    verify_chain(dev.device_id, tuple(impostor.chain))  # valid on its own
    with pytest.raises(RotationChainForked):
        verify_chain(dev.device_id, tuple(impostor.chain), dev.genesis_pk)


def test_a_junk_record_is_not_a_fork() -> None:
    """Anyone can self-sign a record with two fresh keys; if that were called a fork, an
    inbox could make a contact believe a device was stolen.  It does not follow from the
    chain, so the chain is broken, not forked."""
    rng, dev = _device(b"junk", rotations=2)
    a, b = rng(32), rng(32)
    for seq in (1, 2):
        junk = RotationRecord(
            dev.device_id, seq, ed25519_public(a), ed25519_public(b), bytes(32), NOW
        ).signed(a, b)
        for order in ((*dev.chain, junk), (junk, *dev.chain)):
            with pytest.raises(RotationChainBroken):
                verify_chain(dev.device_id, order)
            with pytest.raises(RotationChainBroken):
                verify_chain(dev.device_id, order, dev.genesis_pk)


def test_rotation_record_sequence_starts_at_one() -> None:
    _, dev = _device(b"seq0", rotations=1)
    rec = dev.chain[0]
    data = bytearray(rec.encode())
    data[4 + 16 : 4 + 16 + 4] = bytes(4)
    with pytest.raises(MalformedData):
        RotationRecord.parse(bytes(data))
