"""The key bundle an inbox serves for a mailbox, and its one verification function.

A bundle is a container of independently signed records (server binding, device list,
rotation chains, prekeys, profile) plus the inbox's unsigned anti-spam policy (the inbox is the
enforcement point for that policy anyway, and a lying inbox can only refuse mail it would refuse
regardless).  :func:`verify_bundle` checks every signature, every chain link, the device-list
version against what the caller pinned before, the binding against the onion address the
bundle was fetched from, and prekey expiry, and returns only keys that passed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.keys import (
    MAX_CHAIN,
    MAX_DEVICES,
    DeviceList,
    Profile,
    RotationRecord,
    ServerBinding,
    SignedPrekey,
    verify_chain,
)
from onionpost.core.errors import (
    BadSignature,
    BindingMismatch,
    DeviceListRollback,
    IdentityKeyChanged,
    KeyBundleError,
    MalformedData,
    PrekeyExpired,
    RotationChainBroken,
    RotationChainForked,
)

MAX_BUNDLE_BYTES = 1 << 20
#: Longest lifetime of a prekey that senders accept (devices rotate weekly; see keylife).
MAX_PREKEY_LIFETIME = 90 * 86_400


@dataclass(frozen=True)
class AntiSpamPolicy:
    pow_bits: int
    accepts_strangers: bool
    max_envelope_bytes: int


@dataclass(frozen=True)
class KeyBundle:
    MAGIC = b"OPkb"

    local: str
    binding: ServerBinding
    device_list: DeviceList
    chains: dict[bytes, tuple[RotationRecord, ...]]
    prekeys: tuple[SignedPrekey, ...]
    policy: AntiSpamPolicy
    profile: Profile | None = None

    def encode(self) -> bytes:
        w = Writer().raw(self.MAGIC).var8(self.local.encode("ascii"))
        w.var16(self.binding.encode()).var32(self.device_list.encode())
        w.u16(len(self.chains))
        for device_id in sorted(self.chains):
            w.fixed(device_id, 16).u16(len(self.chains[device_id]))
            for rec in self.chains[device_id]:
                w.var16(rec.encode())
        w.u16(len(self.prekeys))
        for p in self.prekeys:
            w.var16(p.encode())
        w.u8(self.policy.pow_bits).u8(1 if self.policy.accepts_strangers else 0)
        w.u64(self.policy.max_envelope_bytes)
        w.var32(self.profile.encode() if self.profile else b"")
        return w.getvalue()

    @classmethod
    def parse(cls, data: bytes) -> KeyBundle:
        if len(data) > MAX_BUNDLE_BYTES:
            raise MalformedData("The key bundle is larger than 1 MiB.")
        r = Reader(data, "key bundle")
        r.magic(cls.MAGIC)
        local_raw = r.var8("user name", 64)
        if not local_raw.isascii():
            raise MalformedData("The key bundle's user name is not ASCII.")
        binding = ServerBinding.parse(r.var16("server binding"))
        device_list = DeviceList.parse(r.var32("device list", 256 * 1024))
        chains: dict[bytes, tuple[RotationRecord, ...]] = {}
        for _ in range(r.count("rotation chains", MAX_DEVICES)):
            device_id = r.fixed(16, "device id")
            n = r.count("rotation records", MAX_CHAIN)
            if device_id in chains:
                raise MalformedData("The key bundle lists one device's rotation chain twice.")
            chains[device_id] = tuple(
                RotationRecord.parse(r.var16("rotation record")) for _ in range(n)
            )
        prekeys = tuple(
            SignedPrekey.parse(r.var16("prekey"))
            for _ in range(r.count("prekeys", 4 * MAX_DEVICES))
        )
        pow_bits = r.u8("proof-of-work difficulty")
        strangers = r.u8("stranger policy")
        max_env = r.u64("size limit")
        if pow_bits > 40 or strangers > 1:
            raise MalformedData("The key bundle's anti-spam policy is out of range.")
        profile_raw = r.var32("profile", 128 * 1024)
        profile = Profile.parse(profile_raw) if profile_raw else None
        r.end()
        policy = AntiSpamPolicy(pow_bits, strangers == 1, max_env)
        return cls(
            local_raw.decode("ascii"), binding, device_list, chains, prekeys, policy, profile
        )


@dataclass(frozen=True)
class DeviceHead:
    seq: int
    pk: bytes
    genesis_pk: bytes


@dataclass(frozen=True)
class Pin:
    """What a sender remembers about a contact between bundle fetches (trust on first use)."""

    uik_pk: bytes
    device_list_version: int
    device_list_digest: bytes
    heads: dict[bytes, DeviceHead] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifiedDevice:
    device_id: bytes
    name: str
    dsk_seq: int
    dsk_pk: bytes
    spk_id: int
    spk_pk: bytes
    spk_not_after: int


@dataclass(frozen=True)
class VerifiedBundle:
    local: str
    uik_pk: bytes
    onion_pk: bytes
    mailbox_id: bytes
    sek_id: int
    sek_pk: bytes
    binding_not_after: int
    device_list: DeviceList
    devices: tuple[VerifiedDevice, ...]
    #: Every key each listed device has ever signed with, by sequence number (to check
    #: signatures on mail written before a rotation).
    device_keys: dict[bytes, dict[int, bytes]]
    #: Devices listed but left out because they have no usable prekey, with the reason.
    skipped: dict[bytes, str]
    policy: AntiSpamPolicy
    profile: Profile | None
    pin: Pin
    #: Why the bundle's profile was left out (it did not verify for this identity), if it was.
    profile_problem: str | None = None

    def signing_key(self, device_id: bytes, seq: int) -> bytes | None:
        return self.device_keys.get(device_id, {}).get(seq)


def verify_bundle(
    bundle: KeyBundle,
    *,
    onion_pk: bytes,
    local: str,
    now: int,
    pin: Pin | None = None,
    prekey_grace: int = 0,
) -> VerifiedBundle:
    """Verify everything in ``bundle`` and return only what verified.

    ``onion_pk`` is the key of the onion the bundle was fetched from (or that the address
    names); ``pin`` is the caller's memory of this contact, ``None`` on first contact.
    ``prekey_grace`` lets a sender use a cached bundle whose prekeys expired at most that
    many seconds ago.
    """
    binding, dl = bundle.binding, bundle.device_list
    if bundle.local != local:
        raise BindingMismatch(f"The inbox served keys for '{bundle.local}', not for '{local}'.")
    binding.verify()
    dl.verify()
    if binding.uik_pk != dl.uik_pk:
        raise KeyBundleError("The server binding and the device list name different identities.")
    if binding.onion_pk != onion_pk:
        raise BindingMismatch()
    if binding.local != local:
        raise BindingMismatch(f"The keys were issued for '{binding.local}', not for '{local}'.")
    if binding.not_after < now:
        raise KeyBundleError("The recipient's inbox binding has expired; they must renew it.")
    if pin is not None:
        _check_pin(dl, pin)

    device_keys, heads = _verify_chains(bundle, pin)
    devices, skipped = _pick_prekeys(bundle, heads, now, prekey_grace)
    if not devices:
        raise PrekeyExpired(
            f"None of {local}'s devices has a current encryption key; they need to bring a "
            "device online so it can publish one."
        )
    profile, profile_problem = bundle.profile, None
    if profile is not None:
        try:
            profile.verify_for(dl.uik_pk)
        except BadSignature as exc:
            # The profile is decoration: the keys verified, so mail can still be sealed.
            # A profile that does not verify is left out (the caller says so), never shown.
            profile, profile_problem = None, str(exc)
    return VerifiedBundle(
        local=local,
        uik_pk=dl.uik_pk,
        onion_pk=onion_pk,
        mailbox_id=binding.mailbox_id,
        sek_id=binding.sek_id,
        sek_pk=binding.sek_pk,
        binding_not_after=binding.not_after,
        device_list=dl,
        devices=tuple(devices),
        device_keys=device_keys,
        skipped=skipped,
        policy=bundle.policy,
        profile=profile,
        pin=Pin(dl.uik_pk, dl.version, dl.digest(), heads),
        profile_problem=profile_problem,
    )


def _verify_chains(
    bundle: KeyBundle, pin: Pin | None
) -> tuple[dict[bytes, dict[int, bytes]], dict[bytes, DeviceHead]]:
    """Check every listed device's rotation chain against the device list and the pin."""
    device_keys: dict[bytes, dict[int, bytes]] = {}
    heads: dict[bytes, DeviceHead] = {}
    for entry in bundle.device_list.devices:
        records = bundle.chains.get(entry.device_id, ())
        pinned = pin.heads.get(entry.device_id) if pin else None
        genesis = pinned.genesis_pk if pinned else (entry.dsk_pk if not records else None)
        head, keys = verify_chain(entry.device_id, records, genesis)
        if keys.get(entry.dsk_seq) != entry.dsk_pk:
            raise RotationChainBroken(
                f"The device list's key for device '{entry.name}' is not in its rotation chain."
            )
        if pinned is not None:
            if head.seq < pinned.seq:
                raise RotationChainBroken(
                    f"Device '{entry.name}' went back to an older key than one seen before."
                )
            if keys.get(pinned.seq) != pinned.pk:
                raise RotationChainForked()
        device_keys[entry.device_id] = keys
        heads[entry.device_id] = DeviceHead(head.seq, head.pk, head.genesis_pk)
    return device_keys, heads


def _pick_prekeys(
    bundle: KeyBundle, heads: dict[bytes, DeviceHead], now: int, grace: int
) -> tuple[list[VerifiedDevice], dict[bytes, str]]:
    """The newest valid prekey of each device, signed by the device's current key."""
    devices: list[VerifiedDevice] = []
    skipped: dict[bytes, str] = {}
    for entry in bundle.device_list.devices:
        head = heads[entry.device_id]
        best: SignedPrekey | None = None
        for spk in bundle.prekeys:
            if spk.device_id != entry.device_id or spk.dsk_seq != head.seq:
                continue
            if not 0 <= spk.not_after - spk.created_at <= MAX_PREKEY_LIFETIME:
                continue  # a key meant to live for years defeats forward secrecy: ignore it
            try:
                spk.verify(head.pk)
            except BadSignature:
                continue  # one damaged prekey must not make the whole bundle unusable
            if spk.not_after + grace < now:
                continue
            if best is None or spk.created_at > best.created_at:
                best = spk
        if best is None:
            skipped[entry.device_id] = PrekeyExpired.summary()
            continue
        devices.append(
            VerifiedDevice(
                entry.device_id,
                entry.name,
                head.seq,
                head.pk,
                best.spk_id,
                best.spk_pk,
                best.not_after,
            )
        )
    return devices, skipped


def _check_pin(dl: DeviceList, pin: Pin) -> None:
    if dl.uik_pk != pin.uik_pk:
        raise IdentityKeyChanged()
    if dl.version < pin.device_list_version:
        raise DeviceListRollback(
            f"The inbox served device list version {dl.version}, older than version "
            f"{pin.device_list_version} seen before; someone may be replaying old keys."
        )
    if dl.version == pin.device_list_version and dl.digest() != pin.device_list_digest:
        raise DeviceListRollback(
            f"Two different device lists both claim version {dl.version}; the identity key "
            "may have been misused."
        )
    for device_id in pin.heads:
        if dl.is_revoked(device_id):
            continue
        if dl.device(device_id) is None and dl.version == pin.device_list_version:
            raise DeviceListRollback(
                "A device vanished from the device list without a new version."
            )
