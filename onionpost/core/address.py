"""Mail addresses of the form ``local@<56-character v3 onion>.onion``.

The domain is the inbox's Tor v3 onion address, which *is* a public key (rend-spec-v3 §6):
``base32(PUBKEY || CHECKSUM || VERSION)`` with ``CHECKSUM = SHA3-256(".onion checksum" ||
PUBKEY || VERSION)[:2]`` and ``VERSION = 0x03``.  Parsing checks the length, the alphabet, the
version byte, the checksum and that the key is a valid prime-order point, and says which of
those failed.  Addresses compare case-insensitively and print in lower case.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from dataclasses import dataclass

from onionpost.core.crypto.primitives import ed25519_is_valid_point
from onionpost.core.errors import AddressError

ONION_VERSION = b"\x03"
ONION_LABEL_LENGTH = 56
_BASE32_CHARS = re.compile(r"^[a-z2-7]+$")
# RFC 5322 dot-atom local part, restricted to what every mail client accepts without quoting.
_LOCAL_PART = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
MAX_LOCAL_PART = 64


def _checksum(pubkey: bytes) -> bytes:
    return hashlib.sha3_256(b".onion checksum" + pubkey + ONION_VERSION).digest()[:2]


@functools.lru_cache(maxsize=4096)  # a pure function, and asked for on every send
def onion_from_public_key(pubkey: bytes) -> str:
    """The 56-character onion label (without ``.onion``) of an Ed25519 public key."""
    if len(pubkey) != 32:
        raise AddressError("An onion service key must be 32 bytes.")
    raw = pubkey + _checksum(pubkey) + ONION_VERSION
    return base64.b32encode(raw).decode("ascii").lower()


@functools.lru_cache(maxsize=4096)
def public_key_from_onion(onion: str) -> bytes:
    """The Ed25519 public key inside an onion label; every part of the label is checked."""
    label = onion.strip().lower().removesuffix(".onion")
    if len(label) != ONION_LABEL_LENGTH:
        raise AddressError(
            f"'{onion}' is not a v3 onion address: it has {len(label)} characters before "
            f".onion, a v3 address has {ONION_LABEL_LENGTH}."
        )
    if not _BASE32_CHARS.fullmatch(label):
        raise AddressError(
            f"'{onion}' is not a v3 onion address: only the letters a-z and digits 2-7 may appear."
        )
    try:
        raw = base64.b32decode(label.upper())
    except binascii.Error as exc:  # pragma: no cover - the regex already excludes this
        raise AddressError(f"'{onion}' is not valid base32.") from exc
    pubkey, checksum, version = raw[:32], raw[32:34], raw[34:]
    if version != ONION_VERSION:
        raise AddressError(
            f"'{onion}' has version byte {version.hex()}; onionpost needs v3 onion addresses "
            "(version 03)."
        )
    if checksum != _checksum(pubkey):
        raise AddressError(
            f"'{onion}' has a wrong checksum: a character was probably mistyped or lost."
        )
    if not ed25519_is_valid_point(pubkey):
        raise AddressError(f"'{onion}' does not contain a usable public key.")
    return pubkey


def is_local_part(text: str) -> bool:
    """Whether ``text`` is a valid (lower-case) local part, as :meth:`Address.parse` demands."""
    return len(text) <= MAX_LOCAL_PART and _LOCAL_PART.fullmatch(text) is not None


@dataclass(frozen=True, order=True)
class Address:
    """A parsed, validated onionpost address."""

    local: str
    onion: str  # 56 lower-case base32 characters, without ".onion"

    @classmethod
    def parse(cls, text: str) -> Address:
        s = text.strip()
        if s.startswith("<") and s.endswith(">"):
            s = s[1:-1].strip()
        if not s.isascii():
            # str.lower() folds some non-ASCII letters into ASCII (U+212A KELVIN SIGN -> "k"),
            # which would let two different strings name one mailbox.
            raise AddressError(f"'{text}' contains characters other than ASCII.")
        if s.count("@") != 1:
            raise AddressError(
                f"'{text}' is not a mail address: it needs exactly one '@', as in "
                "alice@<inbox>.onion."
            )
        local, domain = s.split("@")
        local = local.lower()
        if not local:
            raise AddressError(f"'{text}' has nothing before the '@'.")
        if len(local) > MAX_LOCAL_PART:
            raise AddressError(
                f"'{text}': the part before '@' is longer than {MAX_LOCAL_PART} characters."
            )
        if not _LOCAL_PART.fullmatch(local):  # fullmatch: "$" would accept a final "\n"
            raise AddressError(
                f"'{text}': the part before '@' may hold only letters, digits, dots and "
                "!#$%&'*+/=?^_`{|}~- (no spaces, no leading, trailing or double dots)."
            )
        domain = domain.lower()
        if not domain.endswith(".onion"):
            raise AddressError(
                f"'{text}' is not an onionpost address: onionpost delivers only to "
                "<56-character v3 onion>.onion domains."
            )
        label = domain.removesuffix(".onion")
        if label != label.strip():
            raise AddressError(f"'{text}' has spaces inside the address.")
        public_key_from_onion(domain)
        return cls(local=local, onion=label)

    @classmethod
    def for_key(cls, local: str, onion_public_key: bytes) -> Address:
        return cls.parse(f"{local}@{onion_from_public_key(onion_public_key)}.onion")

    @property
    def domain(self) -> str:
        return f"{self.onion}.onion"

    @property
    def onion_public_key(self) -> bytes:
        return public_key_from_onion(self.onion)

    def __str__(self) -> str:
        return f"{self.local}@{self.onion}.onion"


def tor_service_key_blob(seed: bytes) -> str:
    """Tor's ``ED25519-V3`` ADD_ONION key: base64 of the expanded (clamped) secret key.

    Tor stores the scalar and PRF secret rather than the seed (control-spec §3.27), so the
    same seed always yields the same onion address.
    """
    if len(seed) != 32:
        raise AddressError("An onion service seed must be 32 bytes.")
    h = bytearray(hashlib.sha512(seed).digest())
    h[0] &= 248
    h[31] &= 63
    h[31] |= 64
    return base64.b64encode(bytes(h)).decode("ascii")
