"""Keys and the signed records that publish them.

Trust flows from one root per user, the **user identity key** (UIK, Ed25519):

* the UIK signs the **device list** (numbered, monotonic: adding, rotating, revoking a device
  makes a new version) and the **server binding** (which inbox onion, which mailbox id, which
  server envelope key may receive this user's mail, until when);
* each device has a **device signing key** (DSK, Ed25519) that rotates; a **rotation record** is
  signed by the old *and* the new key, so a device can rotate while the UIK is offline, and a
  stolen old key alone cannot rotate the device onto an attacker's key;
* each device publishes a **signed prekey** (SPK, X25519) signed by its current DSK with a
  ``not_after``; senders encrypt to it.

Every signature is over a context string (``onionpost/v1/<record>\\0``) followed by the
record's canonical encoding, so a signature for one kind of record can never be replayed as
another.  The byte layouts are normative; ``docs/protocol.md`` documents them with vectors.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, replace
from functools import cached_property

from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.primitives import (
    RandomSource,
    ed25519_is_valid_point,
    ed25519_public,
    ed25519_sign,
    ed25519_verify,
    hash32,
    kdf,
    mac32,
    system_random,
    x25519_public,
)
from onionpost.core.errors import (
    BadSignature,
    MalformedData,
    RotationChainBroken,
    RotationChainForked,
)

CTX_DEVICE_LIST = b"onionpost/v1/device-list\x00"
CTX_ROTATION = b"onionpost/v1/rotation\x00"
CTX_PREKEY = b"onionpost/v1/prekey\x00"
CTX_BINDING = b"onionpost/v1/server-binding\x00"
CTX_BINDING_ONION = b"onionpost/v1/server-binding-onion\x00"
#: KDF label of the inbox's record key: the key of the keyed hashes its database keeps where
#: only equality is needed (local to one inbox, never on the wire).
CTX_RECORD_KEY = b"onionpost/v1/inbox-record-key"
CTX_PROFILE = b"onionpost/v1/profile\x00"
CTX_GENESIS = b"onionpost/v1/rotation-genesis\x00"

MAX_DEVICES = 64
MAX_REVOKED = 1024
MAX_NAME_BYTES = 64
MAX_AVATAR_BYTES = 64 * 1024
MAX_CHAIN = 4096
DEVICE_ID_BYTES = 16
MAILBOX_ID_BYTES = 16


def _check_key(pk: bytes, what: str) -> None:
    if not ed25519_is_valid_point(pk):
        raise MalformedData(f"The {what} is not a valid Ed25519 public key.")


def _name(raw: bytes, r: Reader, what: str) -> str:
    text = r.utf8(raw, what)
    if any(ch in text for ch in "\r\n\x00"):
        raise MalformedData(f"The {r.what}'s {what} contains control characters.")
    return text


# --- device list ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceEntry:
    device_id: bytes
    dsk_pk: bytes
    dsk_seq: int
    added_at: int
    name: str

    def write(self, w: Writer) -> None:
        w.fixed(self.device_id, DEVICE_ID_BYTES).fixed(self.dsk_pk, 32).u32(self.dsk_seq)
        w.u64(self.added_at).var8(self.name.encode("utf-8"))

    @classmethod
    def read(cls, r: Reader) -> DeviceEntry:
        device_id = r.fixed(DEVICE_ID_BYTES, "device id")
        dsk_pk = r.fixed(32, "device key")
        _check_key(dsk_pk, "device signing key")
        dsk_seq = r.u32("key sequence number")
        added_at = r.u64("added time")
        name = _name(r.var8("device name", MAX_NAME_BYTES), r, "device name")
        return cls(device_id, dsk_pk, dsk_seq, added_at, name)


@dataclass(frozen=True)
class RevokedDevice:
    device_id: bytes
    revoked_at: int


@dataclass(frozen=True)
class DeviceList:
    """The UIK-signed list of a user's devices; ``version`` only ever grows."""

    MAGIC = b"OPdl"

    uik_pk: bytes
    version: int
    issued_at: int
    devices: tuple[DeviceEntry, ...]
    revoked: tuple[RevokedDevice, ...] = ()
    signature: bytes = b""

    def body(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.uik_pk, 32).u32(self.version).u64(self.issued_at)
        w.u16(len(self.devices))
        for d in self.devices:
            d.write(w)
        w.u16(len(self.revoked))
        for rv in self.revoked:
            w.fixed(rv.device_id, DEVICE_ID_BYTES).u64(rv.revoked_at)
        return w.getvalue()

    def encode(self) -> bytes:
        return self.body() + self.signature

    def signed(self, uik_seed: bytes) -> DeviceList:
        return replace(self, signature=ed25519_sign(uik_seed, CTX_DEVICE_LIST + self.body()))

    def verify(self) -> None:
        ed25519_verify(self.uik_pk, CTX_DEVICE_LIST + self.body(), self.signature, "device list")

    def digest(self) -> bytes:
        return hash32(self.encode())

    def device(self, device_id: bytes) -> DeviceEntry | None:
        return next((d for d in self.devices if d.device_id == device_id), None)

    def is_revoked(self, device_id: bytes) -> bool:
        return any(rv.device_id == device_id for rv in self.revoked)

    @classmethod
    def parse(cls, data: bytes) -> DeviceList:
        r = Reader(data, "device list")
        r.magic(cls.MAGIC)
        uik_pk = r.fixed(32, "identity key")
        _check_key(uik_pk, "identity key")
        version = r.u32("version")
        issued_at = r.u64("issue time")
        devices = tuple(DeviceEntry.read(r) for _ in range(r.count("devices", MAX_DEVICES)))
        revoked = tuple(
            RevokedDevice(r.fixed(DEVICE_ID_BYTES, "revoked device id"), r.u64("revocation time"))
            for _ in range(r.count("revoked devices", MAX_REVOKED))
        )
        signature = r.fixed(64, "signature")
        r.end()
        ids = [d.device_id for d in devices]
        if len(set(ids)) != len(ids):
            raise MalformedData("The device list names the same device twice.")
        if {rv.device_id for rv in revoked} & set(ids):
            raise MalformedData("The device list names a device as both active and revoked.")
        return cls(uik_pk, version, issued_at, devices, revoked, signature)


# --- device key rotation --------------------------------------------------------------------


def genesis_hash(device_id: bytes, first_pk: bytes) -> bytes:
    """What the first rotation record of a device points back to."""
    return hash32(CTX_GENESIS, device_id, first_pk)


@dataclass(frozen=True)
class RotationRecord:
    """Device key ``seq - 1`` hands over to key ``seq``; signed by both keys."""

    MAGIC = b"OPrr"

    device_id: bytes
    seq: int
    old_pk: bytes
    new_pk: bytes
    prev_hash: bytes
    not_before: int
    sig_old: bytes = b""
    sig_new: bytes = b""

    def body(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.device_id, DEVICE_ID_BYTES).u32(self.seq)
        w.fixed(self.old_pk, 32).fixed(self.new_pk, 32).fixed(self.prev_hash, 32)
        return w.u64(self.not_before).getvalue()

    def encode(self) -> bytes:
        return self.body() + self.sig_old + self.sig_new

    def digest(self) -> bytes:
        return hash32(self.encode())

    def signed(self, old_seed: bytes, new_seed: bytes) -> RotationRecord:
        msg = CTX_ROTATION + self.body()
        return replace(
            self, sig_old=ed25519_sign(old_seed, msg), sig_new=ed25519_sign(new_seed, msg)
        )

    def verify(self) -> None:
        msg = CTX_ROTATION + self.body()
        ed25519_verify(self.old_pk, msg, self.sig_old, "device key rotation (old key)")
        ed25519_verify(self.new_pk, msg, self.sig_new, "device key rotation (new key)")

    @classmethod
    def parse(cls, data: bytes) -> RotationRecord:
        r = Reader(data, "device key rotation record")
        r.magic(cls.MAGIC)
        device_id = r.fixed(DEVICE_ID_BYTES, "device id")
        seq = r.u32("sequence number")
        old_pk = r.fixed(32, "old key")
        new_pk = r.fixed(32, "new key")
        _check_key(old_pk, "old device key")
        _check_key(new_pk, "new device key")
        prev_hash = r.fixed(32, "previous record hash")
        not_before = r.u64("start time")
        sig_old = r.fixed(64, "old-key signature")
        sig_new = r.fixed(64, "new-key signature")
        r.end()
        if seq < 1:
            raise MalformedData("A rotation record's sequence number must be at least 1.")
        return cls(device_id, seq, old_pk, new_pk, prev_hash, not_before, sig_old, sig_new)


@dataclass(frozen=True)
class ChainHead:
    """The newest verified key of a device's rotation chain."""

    device_id: bytes
    seq: int
    pk: bytes
    genesis_pk: bytes


def verify_chain(
    device_id: bytes, records: tuple[RotationRecord, ...], genesis_pk: bytes | None = None
) -> tuple[ChainHead, dict[int, bytes]]:
    """Check a whole rotation chain; return its head and the key at every sequence number.

    ``records`` must be the device's complete history (seq 1..n).  Two different records that
    both validly succeed the same key are a fork (:class:`RotationChainForked`): only a holder
    of that key could have made both.  Anything else out of order or mislinked, including an
    extra record that does not follow from the chain (anyone can self-sign one, so it is no
    evidence that a key was stolen), is :class:`RotationChainBroken`.
    """
    by_seq: dict[int, list[RotationRecord]] = {}
    for rec in records:
        if rec.device_id != device_id:
            raise RotationChainBroken("A rotation record belongs to a different device.")
        rec.verify()
        same_seq = by_seq.setdefault(rec.seq, [])
        if rec not in same_seq:
            same_seq.append(rec)
    if sorted(by_seq) != list(range(1, len(by_seq) + 1)):
        raise RotationChainBroken("The device's key rotation records have gaps.")
    keys: dict[int, bytes] = {}
    if not by_seq:
        if genesis_pk is None:
            raise RotationChainBroken("A device has no key.")
        keys[0] = genesis_pk
        return ChainHead(device_id, 0, genesis_pk, genesis_pk), keys
    if genesis_pk is None:
        genesis_pk = by_seq[1][0].old_pk
    elif all(r.old_pk != genesis_pk for r in by_seq[1]):
        raise RotationChainForked()  # the history starts from another key than the pinned one
    keys[0] = genesis_pk
    prev = genesis_hash(device_id, genesis_pk)
    for seq in range(1, len(by_seq) + 1):
        linked = [r for r in by_seq[seq] if r.old_pk == keys[seq - 1] and r.prev_hash == prev]
        if len(linked) > 1:
            raise RotationChainForked()
        if len(linked) != len(by_seq[seq]):
            raise RotationChainBroken(
                f"Device key rotation {seq} does not follow from the previous key."
            )
        rec = linked[0]
        keys[seq] = rec.new_pk
        prev = rec.digest()
    n = len(by_seq)
    return ChainHead(device_id, n, keys[n], keys[0]), keys


# --- prekeys ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedPrekey:
    """A device's X25519 encryption key, signed by its current device key."""

    MAGIC = b"OPsk"

    device_id: bytes
    dsk_seq: int
    spk_id: int
    spk_pk: bytes
    created_at: int
    not_after: int
    signature: bytes = b""

    def body(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.device_id, DEVICE_ID_BYTES).u32(self.dsk_seq)
        w.u32(self.spk_id).fixed(self.spk_pk, 32).u64(self.created_at).u64(self.not_after)
        return w.getvalue()

    def encode(self) -> bytes:
        return self.body() + self.signature

    def signed(self, dsk_seed: bytes) -> SignedPrekey:
        return replace(self, signature=ed25519_sign(dsk_seed, CTX_PREKEY + self.body()))

    def verify(self, dsk_pk: bytes) -> None:
        ed25519_verify(dsk_pk, CTX_PREKEY + self.body(), self.signature, "device prekey")

    @classmethod
    def parse(cls, data: bytes) -> SignedPrekey:
        r = Reader(data, "signed prekey")
        r.magic(cls.MAGIC)
        device_id = r.fixed(DEVICE_ID_BYTES, "device id")
        dsk_seq = r.u32("device key sequence number")
        spk_id = r.u32("prekey id")
        spk_pk = r.fixed(32, "prekey")
        created_at = r.u64("creation time")
        not_after = r.u64("expiry time")
        signature = r.fixed(64, "signature")
        r.end()
        return cls(device_id, dsk_seq, spk_id, spk_pk, created_at, not_after, signature)


# --- server binding and profile ---------------------------------------------------------------


@dataclass(frozen=True)
class ServerBinding:
    """Who receives a user's mail: signed by the user's UIK *and* by the inbox's onion key.

    The UIK's signature says "my mail goes to this onion, this mailbox, sealed to this SEK".
    The onion key's countersignature says "this inbox hosts ``local`` for that UIK".  The
    onion key *is* the address, so only the real inbox can countersign: without it anyone
    could bind their own UIK to someone else's address and, on first contact, be believed.
    The countersignature uses its own context string, and tor itself only ever signs with
    blinded keys, so the onion key's use here cannot be confused with tor's.
    """

    MAGIC = b"OPsb"

    uik_pk: bytes
    onion_pk: bytes
    mailbox_id: bytes
    local: str
    sek_id: int
    sek_pk: bytes
    issued_at: int
    not_after: int
    signature: bytes = b""
    onion_signature: bytes = b""

    def body(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.uik_pk, 32).fixed(self.onion_pk, 32)
        w.fixed(self.mailbox_id, MAILBOX_ID_BYTES).var8(self.local.encode("ascii"))
        w.u32(self.sek_id).fixed(self.sek_pk, 32)
        return w.u64(self.issued_at).u64(self.not_after).getvalue()

    def encode(self) -> bytes:
        return self.body() + self.signature + self.onion_signature

    def signed(self, uik_seed: bytes) -> ServerBinding:
        return replace(self, signature=ed25519_sign(uik_seed, CTX_BINDING + self.body()))

    def countersigned(self, onion_seed: bytes) -> ServerBinding:
        """The inbox's countersignature (it holds the onion key's seed)."""
        return replace(
            self, onion_signature=ed25519_sign(onion_seed, CTX_BINDING_ONION + self.body())
        )

    def verify_uik(self) -> None:
        ed25519_verify(self.uik_pk, CTX_BINDING + self.body(), self.signature, "server binding")

    def verify(self) -> None:
        """Both signatures; a binding the inbox did not countersign is not valid."""
        self.verify_uik()
        if not self.onion_signature:
            raise BadSignature("The server binding lacks the inbox's countersignature.")
        ed25519_verify(
            self.onion_pk,
            CTX_BINDING_ONION + self.body(),
            self.onion_signature,
            "server binding (inbox countersignature)",
        )

    @classmethod
    def parse(cls, data: bytes) -> ServerBinding:
        r = Reader(data, "server binding")
        r.magic(cls.MAGIC)
        uik_pk = r.fixed(32, "identity key")
        _check_key(uik_pk, "identity key")
        onion_pk = r.fixed(32, "onion key")
        mailbox_id = r.fixed(MAILBOX_ID_BYTES, "mailbox id")
        local_raw = r.var8("user name", 64)
        if not local_raw.isascii() or not local_raw:
            raise MalformedData("The server binding's user name is not ASCII.")
        sek_id = r.u32("server key id")
        sek_pk = r.fixed(32, "server key")
        issued_at = r.u64("issue time")
        not_after = r.u64("expiry time")
        signature = r.fixed(64, "signature")
        onion_signature = r.fixed(64, "inbox countersignature") if r.remaining else b""
        r.end()
        return cls(
            uik_pk,
            onion_pk,
            mailbox_id,
            local_raw.decode("ascii"),
            sek_id,
            sek_pk,
            issued_at,
            not_after,
            signature,
            onion_signature,
        )


@dataclass(frozen=True)
class Profile:
    """Optional public profile: a display name and an avatar, signed by the UIK."""

    MAGIC = b"OPpf"

    uik_pk: bytes
    issued_at: int
    display_name: str
    avatar_type: str = ""
    avatar: bytes = b""
    signature: bytes = b""

    def body(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.uik_pk, 32).u64(self.issued_at)
        w.var8(self.display_name.encode("utf-8")).var8(self.avatar_type.encode("ascii"))
        return w.var32(self.avatar).getvalue()

    def encode(self) -> bytes:
        return self.body() + self.signature

    def signed(self, uik_seed: bytes) -> Profile:
        return replace(self, signature=ed25519_sign(uik_seed, CTX_PROFILE + self.body()))

    def verify(self) -> None:
        ed25519_verify(self.uik_pk, CTX_PROFILE + self.body(), self.signature, "profile")

    def verify_for(self, uik_pk: bytes) -> None:
        """Verify the signature and that the profile is ``uik_pk``'s (a valid profile of
        someone else, replayed in a bundle or a message, is as bad as a forged one)."""
        if self.uik_pk != uik_pk:
            raise BadSignature("The profile was signed by a different identity.")
        self.verify()

    def card(self) -> Profile:
        """The same profile without the avatar, unsigned: what a device puts in each message
        (a few dozen bytes, where the avatar may be 64 KiB); sign it with :meth:`signed`."""
        return replace(self, avatar_type="", avatar=b"", signature=b"")

    @property
    def shown_name(self) -> str:
        """The display name as it may be shown: see :func:`shown_name`."""
        return shown_name(self.display_name)

    @classmethod
    def parse(cls, data: bytes) -> Profile:
        r = Reader(data, "profile")
        r.magic(cls.MAGIC)
        uik_pk = r.fixed(32, "identity key")
        issued_at = r.u64("issue time")
        name = _name(r.var8("display name", MAX_NAME_BYTES), r, "display name")
        avatar_type_raw = r.var8("avatar type", 64)
        if not avatar_type_raw.isascii() or (
            avatar_type_raw and not avatar_type_raw.startswith(b"image/")
        ):
            raise MalformedData("The profile's avatar type must be an image/* media type.")
        avatar = r.var32("avatar", MAX_AVATAR_BYTES)
        signature = r.fixed(64, "signature")
        r.end()
        return cls(uik_pk, issued_at, name, avatar_type_raw.decode("ascii"), avatar, signature)


def shown_name(text: str) -> str:
    """``text`` without control, format-direction or line characters and with its spaces
    collapsed: a name someone else chose must not reorder or hide what is shown next to it
    (a right-to-left override can make "moc.knab" read as "bank.com")."""
    kept = []
    for ch in text:
        if ch in _BIDI_CONTROLS or unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            kept.append(" ")
        else:
            kept.append(ch)
    return " ".join("".join(kept).split())


_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


# --- private key material ---------------------------------------------------------------------


@dataclass(frozen=True)
class PrekeySecret:
    spk_id: int
    secret: bytes
    created_at: int
    not_after: int
    retired_at: int = 0  # 0 while current

    @cached_property
    def public(self) -> bytes:
        """Derived once per object: opening a message needs it for the stanza key."""
        return x25519_public(self.secret)


@dataclass
class DeviceSecrets:
    """Everything private to one device: its signing key history and prekeys."""

    MAGIC = b"OPKd"

    device_id: bytes
    name: str
    dsk_seed: bytes
    dsk_seq: int
    genesis_pk: bytes
    chain: list[RotationRecord] = field(default_factory=list)
    prekeys: list[PrekeySecret] = field(default_factory=list)

    @classmethod
    def generate(
        cls,
        name: str,
        now: int,
        *,
        prekey_lifetime: int = 7 * 86_400,
        rng: RandomSource = system_random,
    ) -> DeviceSecrets:
        seed = rng(32)
        dev = cls(rng(DEVICE_ID_BYTES), name, seed, 0, ed25519_public(seed))
        dev.new_prekey(now, prekey_lifetime, rng=rng)
        return dev

    @property
    def dsk_pk(self) -> bytes:
        return ed25519_public(self.dsk_seed)

    def entry(self, added_at: int) -> DeviceEntry:
        return DeviceEntry(self.device_id, self.dsk_pk, self.dsk_seq, added_at, self.name)

    def rotate_signing_key(self, now: int, *, rng: RandomSource = system_random) -> RotationRecord:
        """Make a new device key, signed over by the old one; the old private key is dropped."""
        new_seed = rng(32)
        prev = (
            self.chain[-1].digest() if self.chain else genesis_hash(self.device_id, self.genesis_pk)
        )
        rec = RotationRecord(
            self.device_id, self.dsk_seq + 1, self.dsk_pk, ed25519_public(new_seed), prev, now
        ).signed(self.dsk_seed, new_seed)
        self.chain.append(rec)
        self.dsk_seed, self.dsk_seq = new_seed, rec.seq
        return rec

    def new_prekey(
        self, now: int, lifetime: int, *, rng: RandomSource = system_random
    ) -> PrekeySecret:
        """Start a new prekey; the previous current one is retired (kept to open late mail)."""
        taken = {p.spk_id for p in self.prekeys}
        spk_id = int.from_bytes(rng(4), "big")
        while spk_id in taken:  # pragma: no cover - 2**-32
            spk_id = int.from_bytes(rng(4), "big")
        self.prekeys = [
            replace(p, retired_at=now) if p.retired_at == 0 else p for p in self.prekeys
        ]
        pk = PrekeySecret(spk_id, rng(32), now, now + lifetime)
        self.prekeys.append(pk)
        return pk

    def current_prekey(self) -> PrekeySecret:
        return next(p for p in reversed(self.prekeys) if p.retired_at == 0)

    def drop_retired_prekeys(self, now: int, keep_seconds: int) -> int:
        """Delete retired prekey secrets older than ``keep_seconds`` (bounded forward secrecy)."""
        before = len(self.prekeys)
        self.prekeys = [
            p for p in self.prekeys if p.retired_at == 0 or now - p.retired_at < keep_seconds
        ]
        return before - len(self.prekeys)

    def signed_prekey(self, p: PrekeySecret | None = None) -> SignedPrekey:
        p = p or self.current_prekey()
        return SignedPrekey(
            self.device_id,
            self.dsk_seq,
            p.spk_id,
            x25519_public(p.secret),
            p.created_at,
            p.not_after,
        ).signed(self.dsk_seed)

    def encode(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.device_id, DEVICE_ID_BYTES)
        w.var8(self.name.encode("utf-8")).fixed(self.dsk_seed, 32).u32(self.dsk_seq)
        w.fixed(self.genesis_pk, 32).u16(len(self.chain))
        for rec in self.chain:
            w.var16(rec.encode())
        w.u16(len(self.prekeys))
        for p in self.prekeys:
            w.u32(p.spk_id).fixed(p.secret, 32).u64(p.created_at).u64(p.not_after).u64(p.retired_at)
        return w.getvalue()

    @classmethod
    def parse(cls, data: bytes) -> DeviceSecrets:
        r = Reader(data, "device key file")
        r.magic(cls.MAGIC)
        device_id = r.fixed(DEVICE_ID_BYTES, "device id")
        name = _name(r.var8("device name", MAX_NAME_BYTES), r, "device name")
        seed = r.fixed(32, "signing key")
        seq = r.u32("key sequence number")
        genesis = r.fixed(32, "first key")
        chain = [
            RotationRecord.parse(r.var16("rotation record"))
            for _ in range(r.count("rotations", MAX_CHAIN))
        ]
        prekeys = [
            PrekeySecret(
                r.u32("prekey id"),
                r.fixed(32, "prekey"),
                r.u64("created"),
                r.u64("expiry"),
                r.u64("retired"),
            )
            for _ in range(r.count("prekeys", 4096))
        ]
        r.end()
        return cls(device_id, name, seed, seq, genesis, chain, prekeys)


@dataclass
class IdentitySecrets:
    """A user's identity key and the device list it last signed."""

    MAGIC = b"OPKi"

    local: str
    uik_seed: bytes
    created_at: int

    @classmethod
    def generate(
        cls, local: str, now: int, *, rng: RandomSource = system_random
    ) -> IdentitySecrets:
        return cls(local, rng(32), now)

    @property
    def uik_pk(self) -> bytes:
        return ed25519_public(self.uik_seed)

    def encode(self) -> bytes:
        w = Writer().raw(self.MAGIC).var8(self.local.encode("ascii")).fixed(self.uik_seed, 32)
        return w.u64(self.created_at).getvalue()

    @classmethod
    def parse(cls, data: bytes) -> IdentitySecrets:
        r = Reader(data, "identity key file")
        r.magic(cls.MAGIC)
        local_raw = r.var8("user name", 64)
        if not local_raw.isascii():
            raise MalformedData("The identity key file's user name is not ASCII.")
        seed = r.fixed(32, "identity key")
        created_at = r.u64("creation time")
        r.end()
        return cls(local_raw.decode("ascii"), seed, created_at)


@dataclass(frozen=True)
class ServerKey:
    sek_id: int
    secret: bytes
    created_at: int
    retired_at: int = 0

    @cached_property
    def public(self) -> bytes:
        """Derived once per object: opening every envelope needs it for the server keys."""
        return x25519_public(self.secret)


@dataclass
class ServerSecrets:
    """The inbox's onion service seed (its address) and its server envelope keys."""

    MAGIC = b"OPKs"

    onion_seed: bytes
    server_keys: list[ServerKey] = field(default_factory=list)

    @classmethod
    def generate(cls, now: int, *, rng: RandomSource = system_random) -> ServerSecrets:
        s = cls(rng(32))
        s.new_server_key(now, rng=rng)
        return s

    @property
    def onion_pk(self) -> bytes:
        return ed25519_public(self.onion_seed)

    def new_server_key(self, now: int, *, rng: RandomSource = system_random) -> ServerKey:
        taken = {k.sek_id for k in self.server_keys}
        sek_id = int.from_bytes(rng(4), "big")
        while sek_id in taken:  # pragma: no cover - 2**-32
            sek_id = int.from_bytes(rng(4), "big")
        self.server_keys = [
            replace(k, retired_at=now) if k.retired_at == 0 else k for k in self.server_keys
        ]
        key = ServerKey(sek_id, rng(32), now)
        self.server_keys.append(key)
        return key

    def current(self) -> ServerKey:
        return next(k for k in reversed(self.server_keys) if k.retired_at == 0)

    def by_id(self, sek_id: int) -> ServerKey | None:
        return next((k for k in self.server_keys if k.sek_id == sek_id), None)

    def record_key(self) -> bytes:
        """The key of the inbox database's keyed hashes (see :func:`record_hash`).

        Derived from the onion seed, which never rotates while the address stays, so the
        hashes stay comparable for the inbox's whole life and need no key file of their own.
        """
        return kdf(self.onion_seed, CTX_RECORD_KEY)

    def drop_retired(self, now: int, keep_seconds: int) -> int:
        before = len(self.server_keys)
        self.server_keys = [
            k for k in self.server_keys if k.retired_at == 0 or now - k.retired_at < keep_seconds
        ]
        return before - len(self.server_keys)

    def encode(self) -> bytes:
        w = Writer().raw(self.MAGIC).fixed(self.onion_seed, 32).u16(len(self.server_keys))
        for k in self.server_keys:
            w.u32(k.sek_id).fixed(k.secret, 32).u64(k.created_at).u64(k.retired_at)
        return w.getvalue()

    @classmethod
    def parse(cls, data: bytes) -> ServerSecrets:
        r = Reader(data, "server key file")
        r.magic(cls.MAGIC)
        seed = r.fixed(32, "onion key")
        keys = [
            ServerKey(r.u32("key id"), r.fixed(32, "key"), r.u64("created"), r.u64("retired"))
            for _ in range(r.count("server keys", 1024))
        ]
        r.end()
        return cls(seed, keys)


def record_hash(record_key: bytes, value: bytes) -> bytes:
    """The keyed hash an inbox stores instead of a value it only compares for equality
    (an idempotency key naming a recipient, an envelope digest): BLAKE2b-256 keyed with
    :meth:`ServerSecrets.record_key`.  Whoever reads the database without the key cannot
    confirm a guessed value."""
    return mac32(record_key, value)
