"""local@<v3 onion>.onion addresses (rend-spec-v3 §6) and Tor's ADD_ONION key blob."""

from __future__ import annotations

import base64
import hashlib

import nacl.bindings
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stem.descriptor.hidden_service import HiddenServiceDescriptorV3

from onionpost.core.address import (
    Address,
    onion_from_public_key,
    public_key_from_onion,
    tor_service_key_blob,
)
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import AddressError

SEED = SeededRandom(b"address")(32)
PK = ed25519_public(SEED)
ONION = onion_from_public_key(PK)
# A point of order 8 (from libsodium's list of small-order points): adding it to a key keeps
# the checksum computable but makes the key unusable, which tor also refuses.
ORDER8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")


def _label(pk: bytes, version: int = 3, checksum: bytes | None = None) -> str:
    v = bytes([version])
    chk = checksum or hashlib.sha3_256(b".onion checksum" + pk + v).digest()[:2]
    return base64.b32encode(pk + chk + v).decode().lower()


def test_reference_formula_and_stem_agree() -> None:
    assert _label(PK) == ONION
    assert HiddenServiceDescriptorV3.address_from_identity_key(PK, suffix=False) == ONION
    assert len(ONION) == 56
    assert ONION.endswith("d")  # version 3 always ends the label in "d"


def test_parse_valid_and_normalise() -> None:
    a = Address.parse(f"Alice.Smith@{ONION.upper()}.ONION")
    assert (a.local, a.onion) == ("alice.smith", ONION)
    assert str(a) == f"alice.smith@{ONION}.onion"
    assert a.domain == f"{ONION}.onion"
    assert a.onion_public_key == PK
    assert Address.parse(f"  <alice.smith@{ONION}.onion>  ") == a
    assert Address.for_key("alice.smith", PK) == a
    assert Address.parse(str(a)) == a


@pytest.mark.parametrize(
    "text",
    [
        f"alice@{ONION[:-1]}.onion",  # 55 characters
        f"alice@{ONION}a.onion",  # 57
        f"alice@{ONION[:10]}0{ONION[11:]}.onion",  # 0 is not base32
        f"alice@{ONION[:10]}1{ONION[11:]}.onion",
        f"alice@{ONION[:10]}8{ONION[11:]}.onion",
        f"alice@{ONION[:10]}-{ONION[11:]}.onion",
        f"alice@{ONION}.onion.onion",
        f"alice@{ONION}.com",
        f"alice@{ONION}",
        "alice@example.org",
        f"{ONION}.onion",  # no local part
        f"@{ONION}.onion",
        f"alice@bob@{ONION}.onion",
        f"{'a' * 65}@{ONION}.onion",
        f"al ice@{ONION}.onion",
        f"alice.@{ONION}.onion",
        f".alice@{ONION}.onion",
        f"al..ice@{ONION}.onion",
        f'"alice"@{ONION}.onion',
        # characters that must never reach an SMTP or IMAP line
        f"alice\n@{ONION}.onion",
        f"alice\r\n@{ONION}.onion",
        f"alice\x00@{ONION}.onion",
        f"alice@ {ONION}.onion",
        f"alice@{ONION}\t.onion",
        f"alice@{ONION}\n.onion",
        # non-ASCII that lower() would fold to ASCII (KELVIN SIGN -> k)
        f"\u212aate@{ONION}.onion",
        f"alice@{ONION.replace('k', chr(0x212A), 1)}.onion" if "k" in ONION else "\u212a@x",
        "",
        "   ",
    ],
)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(AddressError):
        Address.parse(text)


def test_bad_checksum_one_character_changed() -> None:
    for i in (0, 10, 30, 50, 53):  # inside the key and inside the checksum
        c = ONION[i]
        other = "a" if c != "a" else "b"
        with pytest.raises(AddressError, match=r"checksum|version"):
            public_key_from_onion(ONION[:i] + other + ONION[i + 1 :])


def test_wrong_version_byte() -> None:
    with pytest.raises(AddressError, match="version"):
        public_key_from_onion(_label(PK, version=2))
    with pytest.raises(AddressError, match="version"):
        public_key_from_onion(_label(PK, version=4))


def test_torsion_and_invalid_points() -> None:
    torsioned = nacl.bindings.crypto_core_ed25519_add(PK, ORDER8)
    with pytest.raises(AddressError, match="usable"):
        public_key_from_onion(_label(torsioned))
    with pytest.raises(AddressError, match="usable"):
        public_key_from_onion(_label(ORDER8))
    non_canonical = b"\xff" * 31 + b"\x7f"  # y >= p
    with pytest.raises(AddressError, match="usable"):
        public_key_from_onion(_label(non_canonical))
    with pytest.raises(AddressError):
        Address.for_key("alice", torsioned)


def test_onion_from_public_key_rejects_wrong_length() -> None:
    with pytest.raises(AddressError):
        onion_from_public_key(PK[:31])


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_round_trip(seed: bytes) -> None:
    pk = ed25519_public(seed)
    label = onion_from_public_key(pk)
    assert public_key_from_onion(label) == pk
    assert public_key_from_onion(label.upper() + ".onion") == pk
    assert public_key_from_onion(f" {label}.onion\n") == pk


@settings(max_examples=50, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_tor_service_key_blob(seed: bytes) -> None:
    """The reference formula of crypto-and-tor-facts §1.2, and the two libsodium facts that
    make tor compute the same address from the blob that we compute from the seed."""
    h = bytearray(hashlib.sha512(seed).digest())
    h[0] &= 248
    h[31] &= 63
    h[31] |= 64
    blob = tor_service_key_blob(seed)
    assert blob == base64.b64encode(bytes(h)).decode()
    raw = base64.b64decode(blob)
    assert len(raw) == 64
    pk = ed25519_public(seed)
    assert nacl.bindings.crypto_scalarmult_ed25519_base_noclamp(raw[:32]) == pk
    sk64 = seed + pk
    assert nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(sk64) == raw[:32]


def test_tor_service_key_blob_rejects_wrong_length() -> None:
    with pytest.raises(AddressError):
        tor_service_key_blob(b"x" * 31)
