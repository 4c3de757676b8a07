"""Invite and pairing codes, and the sealed messages of a device pairing.  Pure.

Two one-time codes let a person set up machines without copying files:

* an **invite code** (``users invite`` on an inbox) lets a new person create their identity on
  their own laptop and open a mailbox on that inbox, so no private key of theirs ever exists
  on the inbox;
* a **pairing code** (``devices add`` on an existing device) lets a new machine join an
  identity as another device; the identity key travels inside the exchange, sealed so that the
  inbox that relays it cannot read it.

A code is the inbox's onion address (self-authenticating: tor only connects to the holder of
that key) plus an 80-bit secret and a 20-bit typing check.  Nothing derived from the secret is
ever usable without it: the inbox stores only a hash of the invite *claim*, and a pairing's two
messages are sealed with keys that mix the secret with an ephemeral X25519 exchange, so even
an inbox that records everything and later learns the code cannot open them, and an inbox that
interferes during the exchange would have to find the 80-bit secret within the code's ten
minutes.  Layouts and test vectors: ``docs/protocol.md`` §15.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Literal

from onionpost.core.address import onion_from_public_key, public_key_from_onion
from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.keys import DeviceList, ServerBinding, SignedPrekey
from onionpost.core.crypto.primitives import (
    RandomSource,
    aead_decrypt,
    aead_encrypt,
    hash32,
    kdf,
    system_random,
    x25519,
    x25519_public,
)
from onionpost.core.errors import AddressError, MalformedData, PairingFailed, UsageError

Kind = Literal["invite", "pairing"]

SECRET_BYTES = 10  # 80 bits: 16 base32 characters
CHECK_CHARS = 4  # 20 bits: a typing mistake goes unnoticed once in a million
VERSION = "1"
PREFIX = "op"
_KIND_CHAR: dict[Kind, str] = {"invite": "i", "pairing": "p"}
_CHAR_KIND: dict[str, Kind] = {v: k for k, v in _KIND_CHAR.items()}
_BODY_CHARS = 56 + 16 + CHECK_CHARS
#: Characters people type for the base32 letters they resemble (base32 has no 0, 1 or 8).
_LOOKALIKES = str.maketrans({"0": "o", "1": "l", "8": "b"})
GROUP = 5

CTX_CHECK = b"onionpost/v1/code-check\x00"
LABEL_CLAIM = b"onionpost/v1/invite-claim"
LABEL_SLOT = b"onionpost/v1/pair-slot"
LABEL_JOIN = b"onionpost/v1/pair-join"
LABEL_GRANT = b"onionpost/v1/pair-grant"
NONCE_BYTES = 24


class BadCode(UsageError):
    """The code is not a valid onionpost code."""


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode("ascii").rstrip("=").lower()


def _check(kind: Kind, onion_pk: bytes, secret: bytes) -> str:
    tag = (PREFIX + _KIND_CHAR[kind] + VERSION).encode("ascii")
    return _b32(hash32(CTX_CHECK, tag, onion_pk, secret)[:5])[:CHECK_CHARS]


@dataclass(frozen=True)
class Code:
    """A one-time code: which kind, which inbox, and the secret."""

    kind: Kind
    onion_pk: bytes
    secret: bytes

    @classmethod
    def generate(cls, kind: Kind, onion_pk: bytes, *, rng: RandomSource = system_random) -> Code:
        return cls(kind, onion_pk, rng(SECRET_BYTES))

    @property
    def onion(self) -> str:
        return onion_from_public_key(self.onion_pk)

    def compact(self) -> str:
        """The code without separators (what the QR code holds, upper-cased)."""
        return (
            PREFIX
            + _KIND_CHAR[self.kind]
            + VERSION
            + self.onion
            + _b32(self.secret)
            + _check(self.kind, self.onion_pk, self.secret)
        )

    def text(self) -> str:
        """The code in groups of five, for reading out and typing."""
        raw = self.compact()
        return "-".join(raw[i : i + GROUP] for i in range(0, len(raw), GROUP))

    def qr_payload(self) -> str:
        # Upper case fits QR's alphanumeric mode: a smaller symbol for the same code.
        return self.compact().upper()

    # -- what the secret opens ----------------------------------------------------------

    def claim(self) -> bytes:
        """What redeems an invite; the inbox keeps only ``hash32(claim)``."""
        return kdf(self.secret, LABEL_CLAIM, self.onion_pk)

    def slot(self) -> bytes:
        """The pairing's rendezvous id at the inbox (reveals nothing about the secret)."""
        return kdf(self.secret, LABEL_SLOT, self.onion_pk)[:16]

    @classmethod
    def parse(cls, text: str, expect: Kind | None = None) -> Code:
        """Read a typed or scanned code; every mistake gets its own sentence."""
        raw = "".join(text.split()).replace("-", "").lower()
        if not raw.startswith(PREFIX) or len(raw) < 4:
            raise BadCode("This is not an onionpost code: codes start with 'op'.")
        kind = _CHAR_KIND.get(raw[2])
        if kind is None:
            raise BadCode("This is not an onionpost invite or pairing code.")
        if raw[3] != VERSION:
            raise BadCode(
                "This code was made by a newer version of onionpost; update onionpost here."
            )
        if expect is not None and kind != expect:
            use = "onionpost init --invite" if kind == "invite" else "onionpost init --join"
            raise BadCode(
                f"This is {'an invite' if kind == 'invite' else 'a pairing'} code; "
                f"use it with `{use} CODE`."
            )
        body = raw[4:].translate(_LOOKALIKES)
        if len(body) != _BODY_CHARS:
            full = _BODY_CHARS + 4
            raise BadCode(
                f"The code has {len(body) + 4} characters but should have {full} "
                "(not counting dashes): a part is missing or doubled."
            )
        label, secret_text, check = body[:56], body[56:72], body[72:]
        try:
            onion_pk = public_key_from_onion(label)
            secret = base64.b32decode(secret_text.upper())  # 16 characters: no padding
        except (AddressError, ValueError) as exc:
            raise BadCode(
                "The code has a typing mistake (its inbox address part is not valid)."
            ) from exc
        if check != _check(kind, onion_pk, secret):
            raise BadCode(
                "The code has a typing mistake (its last four characters do not match the "
                "rest). Check it character by character, or scan the QR code."
            )
        return cls(kind, onion_pk, secret)


# --- the pairing exchange ---------------------------------------------------------------------


def transcript(slot: bytes, offer_pk: bytes, join_pk: bytes) -> bytes:
    return slot + offer_pk + join_pk


def _keys(code: Code, shared: bytes, tx: bytes) -> tuple[bytes, bytes]:
    salt = shared + tx
    return kdf(code.secret, LABEL_JOIN, salt), kdf(code.secret, LABEL_GRANT, salt)


def _seal(key: bytes, plaintext: bytes, tx: bytes, rng: RandomSource) -> bytes:
    nonce = rng(NONCE_BYTES)
    return nonce + aead_encrypt(key, nonce, plaintext, tx)


def _open(key: bytes, box: bytes, tx: bytes, what: str) -> bytes:
    if len(box) < NONCE_BYTES + 16:
        raise PairingFailed(f"The {what} is too short.")
    plain = aead_decrypt(key, box[:NONCE_BYTES], box[NONCE_BYTES:], tx)
    if plain is None:
        raise PairingFailed(
            f"The {what} was not sealed with this code: someone who does not have the code "
            "tried to take part. Nothing was changed; start again with a new code."
        )
    return plain


@dataclass(frozen=True)
class JoinRequest:
    """What the new device tells the existing one: its public keys and its name."""

    MAGIC = b"OPjr"

    device_id: bytes
    dsk_pk: bytes
    name: str
    prekey: SignedPrekey
    wants_identity: bool

    def encode(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.device_id, 16).fixed(self.dsk_pk, 32)
        w.var8(self.name.encode("utf-8")).var16(self.prekey.encode())
        return w.u8(1 if self.wants_identity else 0).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> JoinRequest:
        r = Reader(data, "join request")
        r.magic(cls.MAGIC)
        device_id = r.fixed(16, "device id")
        dsk_pk = r.fixed(32, "device key")
        name = r.utf8(r.var8("device name", 64), "device name")
        if not name.strip() or any(ch in name for ch in "\r\n\x00"):
            raise MalformedData("The join request's device name is empty or has control codes.")
        prekey = SignedPrekey.parse(r.var16("prekey"))
        wants = r.u8("identity flag")
        r.end()
        if wants > 1:
            raise MalformedData("The join request's identity flag must be 0 or 1.")
        if prekey.device_id != device_id or prekey.dsk_seq != 0:
            raise MalformedData("The join request's prekey belongs to another key.")
        prekey.verify(dsk_pk)
        return cls(device_id, dsk_pk, name, prekey, bool(wants))


@dataclass(frozen=True)
class JoinGrant:
    """What the existing device gives the new one: the account, and the identity key unless
    the person asked for a device without it."""

    MAGIC = b"OPjg"

    local: str
    mailbox_id: bytes
    self_token: bytes
    binding: ServerBinding
    device_list: DeviceList
    identity_seed: bytes | None
    identity_created_at: int

    def encode(self) -> bytes:
        w = Writer().raw(self.MAGIC).var8(self.local.encode("ascii"))
        w.fixed(self.mailbox_id, 16).fixed(self.self_token, 32).var16(self.binding.encode())
        w.var32(self.device_list.encode()).var8(self.identity_seed or b"")
        return w.u64(self.identity_created_at).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> JoinGrant:
        r = Reader(data, "join grant")
        r.magic(cls.MAGIC)
        local_raw = r.var8("user name", 64)
        if not local_raw or not local_raw.isascii():
            raise MalformedData("The join grant's user name is not ASCII.")
        mailbox_id = r.fixed(16, "mailbox id")
        token = r.fixed(32, "own token")
        binding = ServerBinding.parse(r.var16("binding"))
        device_list = DeviceList.parse(r.var32("device list", 1 << 18))
        seed = r.var8("identity key", 32)
        created = r.u64("identity creation time")
        r.end()
        if seed and len(seed) != 32:
            raise MalformedData("The join grant's identity key has the wrong length.")
        return cls(
            local_raw.decode("ascii"),
            mailbox_id,
            token,
            binding,
            device_list,
            seed or None,
            created,
        )


@dataclass(frozen=True)
class Offer:
    """The existing device's side: its ephemeral key (posted to the inbox as the slot)."""

    code: Code
    secret_key: bytes

    @classmethod
    def create(cls, code: Code, *, rng: RandomSource = system_random) -> Offer:
        return cls(code, rng(32))

    @property
    def public(self) -> bytes:
        return x25519_public(self.secret_key)

    def open_request(self, join_pk: bytes, box: bytes) -> JoinRequest:
        tx = transcript(self.code.slot(), self.public, join_pk)
        k_join, _ = _keys(self.code, x25519(self.secret_key, join_pk), tx)
        return JoinRequest.parse(_open(k_join, box, tx, "join request"))

    def seal_grant(
        self, join_pk: bytes, grant: JoinGrant, *, rng: RandomSource = system_random
    ) -> bytes:
        tx = transcript(self.code.slot(), self.public, join_pk)
        _, k_grant = _keys(self.code, x25519(self.secret_key, join_pk), tx)
        return _seal(k_grant, grant.encode(), tx, rng)


@dataclass(frozen=True)
class Joiner:
    """The new device's side of the exchange."""

    code: Code
    offer_pk: bytes
    secret_key: bytes

    @classmethod
    def create(cls, code: Code, offer_pk: bytes, *, rng: RandomSource = system_random) -> Joiner:
        if len(offer_pk) != 32:
            raise PairingFailed("The inbox answered with a malformed pairing offer.")
        return cls(code, offer_pk, rng(32))

    @property
    def public(self) -> bytes:
        return x25519_public(self.secret_key)

    def _tx_and_keys(self) -> tuple[bytes, bytes, bytes]:
        tx = transcript(self.code.slot(), self.offer_pk, self.public)
        k_join, k_grant = _keys(self.code, x25519(self.secret_key, self.offer_pk), tx)
        return tx, k_join, k_grant

    def seal_request(self, request: JoinRequest, *, rng: RandomSource = system_random) -> bytes:
        tx, k_join, _ = self._tx_and_keys()
        return _seal(k_join, request.encode(), tx, rng)

    def open_grant(self, box: bytes) -> JoinGrant:
        tx, _, k_grant = self._tx_and_keys()
        return JoinGrant.parse(_open(k_grant, box, tx, "answer from your other device"))
