"""Every parser, fed random bytes and mutated valid encodings, fails only with OnionpostError.

Bytes from the network reach these parsers before anything is authenticated, so an
IndexError, struct.error, UnicodeDecodeError, a libsodium exception or a RecursionError
escaping from one would be a crash an attacker can trigger at will.  The mutations keep most
of a valid encoding (so the parser gets deep) and then set bytes, cut, insert, delete, or
write 0xFFFF over a length field.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onionpost.core.address import Address, public_key_from_onion
from onionpost.core.crypto import envelope as env
from onionpost.core.crypto.bundle import KeyBundle, verify_bundle
from onionpost.core.crypto.keys import (
    DeviceList,
    DeviceSecrets,
    IdentitySecrets,
    Profile,
    RotationRecord,
    ServerBinding,
    ServerSecrets,
    SignedPrekey,
)
from onionpost.core.crypto.primitives import SeededRandom
from onionpost.core.crypto.sender import SenderCredentials, pin_encode, pin_parse, verify_sender
from onionpost.core.errors import OnionpostError
from tests.unit.crypto_world import (
    NOW,
    NeverSeen,
    User,
    build_l1,
    forge_l3,
    make_user,
    seal_l1,
    seal_l2,
    wrap_l3_with,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def _world() -> tuple[SeededRandom, User, User]:
    rng = SeededRandom(b"fuzz")
    alice = make_user("alice", 1, rng)
    alice.devices[0].rotate_signing_key(NOW, rng=rng)
    bob = make_user("bob", 3, rng, profile=True)
    bob.devices[0].rotate_signing_key(NOW, rng=rng)
    bob.devices[0].rotate_signing_key(NOW, rng=rng)
    bob.resign_device_list(NOW, revoked=[bob.devices[2].device_id])
    return rng, alice, bob


def _open_outer(data: bytes) -> object:
    _, _, bob = _world()
    return env.open_outer(
        io.BytesIO(data),
        len(data),
        server_key=lambda _id: bob.server.current().secret,  # any key id: get past the lookup
        now=NOW,
        max_l2_bytes=1 << 24,
        l2_sink=io.BytesIO(),
    )


def _open_inner(data: bytes) -> object:
    _, _, bob = _world()
    return env.open_inner(
        io.BytesIO(data),
        len(data),
        prekeys=bob.prekeys(0),
        reader_uik=bob.uik_pk,
        now=NOW,
        seen=NeverSeen(),
        sink=io.BytesIO(),
    )


@functools.cache
def _l3_frame() -> tuple[bytes, bytes, bytes]:
    """(file key, L2 header, a valid L3) for fuzzing the plaintext inside a valid L2."""
    rng, alice, bob = _world()
    file_key = rng(32)
    header = env._l2_header(file_key, bob.targets(), rng)
    l3 = forge_l3(
        alice,
        header,
        b"Subject: fuzz\r\n\r\nbody",
        recipients=[bob.uik_pk],
        overrides={"extensions": ((env.EXT_TOKEN_GRANT, bob.uik_pk + bytes(32)),)},
    )
    return file_key, header, l3


def _open_l3(data: bytes) -> object:
    """Plaintext L3 chosen by a malicious sender, inside an authentic L2."""
    rng, _, _ = _world()
    file_key, header, _ = _l3_frame()
    return _open_inner(wrap_l3_with(data, header, file_key, rng))


def _open_meta(data: bytes) -> object:
    """A malicious sender's L1 metadata (78 bytes, authentic encryption)."""
    rng, _, bob = _world()
    l2, _ = _samples()["open_inner"]
    meta = (data + bytes(env.META_BYTES))[: env.META_BYTES]
    return _open_outer(build_l1(l2, bob, rng, meta=meta))


def _verify_bundle(data: bytes) -> object:
    _, _, bob = _world()
    return verify_bundle(KeyBundle.parse(data), onion_pk=bob.onion_pk, local="bob", now=NOW)


def _verify_sender(data: bytes) -> object:
    _, alice, _ = _world()
    header = env.ContentHeader.parse(_l3_frame()[2][4 : 4 + int.from_bytes(_l3_frame()[2][:4])])
    return verify_sender(header, data, alice.verified().pin, alice.device_list)


def _address(data: bytes) -> object:
    return Address.parse(data.decode("utf-8", "replace"))


def _onion(data: bytes) -> object:
    return public_key_from_onion(data.decode("latin-1"))


@functools.cache
def _samples() -> dict[str, tuple[bytes, Callable[[bytes], object]]]:
    rng, alice, bob = _world()
    assert bob.profile is not None
    l2, _ = seal_l2(alice, [bob], b"Subject: hi\r\n\r\n" + bytes(range(256)) * 300, rng)
    l1 = seal_l1(l2, bob, rng)
    header = env.ContentHeader.parse(_l3_frame()[2][4 : 4 + int.from_bytes(_l3_frame()[2][:4])])
    meta = (
        bob.mailbox_id
        + bytes([env.AUTH_TOKEN])
        + bytes(32 + 13)
        + (NOW + 86_400).to_bytes(8, "big")
        + len(l2).to_bytes(8, "big")
    )
    creds = SenderCredentials(
        alice.binding, alice.device_list, tuple(alice.devices[0].chain)
    ).encode()
    addr = f"bob@{Address.for_key('bob', bob.onion_pk).onion}.onion".encode()
    return {
        "DeviceList.parse": (bob.device_list.encode(), DeviceList.parse),
        "RotationRecord.parse": (bob.devices[0].chain[1].encode(), RotationRecord.parse),
        "SignedPrekey.parse": (bob.devices[0].signed_prekey().encode(), SignedPrekey.parse),
        "ServerBinding.parse": (bob.binding.encode(), ServerBinding.parse),
        "Profile.parse": (bob.profile.encode(), Profile.parse),
        "KeyBundle.parse": (bob.bundle().encode(), KeyBundle.parse),
        "verify_bundle": (bob.bundle().encode(), _verify_bundle),
        "DeviceSecrets.parse": (bob.devices[0].encode(), DeviceSecrets.parse),
        "IdentitySecrets.parse": (bob.identity.encode(), IdentitySecrets.parse),
        "ServerSecrets.parse": (bob.server.encode(), ServerSecrets.parse),
        "ContentHeader.parse": (header.encode(), env.ContentHeader.parse),
        "open_outer": (l1, _open_outer),
        "open_outer (metadata)": (meta, _open_meta),
        "open_inner": (l2, _open_inner),
        "open_inner (L3 plaintext)": (_l3_frame()[2], _open_l3),
        "SenderCredentials.parse": (creds, SenderCredentials.parse),
        "verify_sender": (creds, _verify_sender),
        "pin_parse": (pin_encode(bob.verified().pin), pin_parse),
        "Address.parse": (addr, _address),
        "public_key_from_onion": (addr.split(b"@")[1], _onion),
    }


PARSERS = [
    "DeviceList.parse",
    "RotationRecord.parse",
    "SignedPrekey.parse",
    "ServerBinding.parse",
    "Profile.parse",
    "KeyBundle.parse",
    "verify_bundle",
    "DeviceSecrets.parse",
    "IdentitySecrets.parse",
    "ServerSecrets.parse",
    "ContentHeader.parse",
    "open_outer",
    "open_outer (metadata)",
    "open_inner",
    "open_inner (L3 plaintext)",
    "SenderCredentials.parse",
    "verify_sender",
    "pin_parse",
    "Address.parse",
    "public_key_from_onion",
]


def test_parser_list_is_complete() -> None:
    assert set(PARSERS) == set(_samples())


def _only_onionpost_errors(parse: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(OnionpostError):
        parse(data)


Edit = tuple[str, int, int, bytes]

edits = st.lists(
    st.tuples(
        st.sampled_from(["set", "cut", "insert", "delete", "ffff", "zero"]),
        st.integers(0, 1 << 20),
        st.integers(0, 255),
        st.binary(min_size=1, max_size=9),
    ),
    min_size=1,
    max_size=4,
)


def mutate(data: bytes, ops: list[Edit]) -> bytes:
    out = bytearray(data)
    for op, pos, value, blob in ops:
        at = pos % (len(out) + 1)
        if op == "set" and out:
            out[at % len(out)] = value
        elif op == "cut":
            del out[at:]
        elif op == "insert":
            out[at:at] = blob
        elif op == "delete":
            del out[at : at + 1 + value % 16]
        elif op == "ffff":
            out[at : at + 2] = b"\xff\xff"
        elif op == "zero":
            out[at : at + 4] = bytes(4)
    return bytes(out)


@pytest.mark.parametrize("name", PARSERS)
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes(name: str, data: bytes) -> None:
    _, parse = _samples()[name]
    _only_onionpost_errors(parse, data)


@pytest.mark.parametrize("name", PARSERS)
@FUZZ
@given(data=st.binary(max_size=300))
def test_right_type_marker_then_random(name: str, data: bytes) -> None:
    """Random bytes behind a correct type marker get past the first check."""
    valid, parse = _samples()[name]
    _only_onionpost_errors(parse, valid[:4] + data)


@pytest.mark.parametrize("name", PARSERS)
@FUZZ
@given(ops=edits)
def test_mutated_valid_encoding(name: str, ops: list[Edit]) -> None:
    valid, parse = _samples()[name]
    _only_onionpost_errors(parse, mutate(valid, ops))


def test_valid_samples_parse() -> None:
    """The fuzz seeds are themselves valid, so mutations start from deep inside."""
    for name in PARSERS:
        valid, parse = _samples()[name]
        parse(valid)
