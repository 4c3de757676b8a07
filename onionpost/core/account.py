"""A local user on this device: identity, device keys, and the inbox that holds their mail.

Pure key work: storing an account is ``keystore.AccountFiles``'s job.  Provisioning happens
here too: :func:`create_identity` makes a new identity with its first
device and the UIK-signed records an inbox needs to open a mailbox for it, and
:func:`add_device` makes another device for an existing identity (the UIK signs a new
device list version).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from onionpost.core.address import Address, onion_from_public_key
from onionpost.core.crypto.envelope import SenderKeys
from onionpost.core.crypto.keys import (
    MAX_NAME_BYTES,
    DeviceList,
    DeviceSecrets,
    IdentitySecrets,
    Profile,
    RevokedDevice,
    ServerBinding,
    shown_name,
)
from onionpost.core.crypto.primitives import RandomSource, ed25519_sign, system_random
from onionpost.core.crypto.sender import SenderCredentials
from onionpost.core.errors import UsageError
from onionpost.core.wire import KeyUpdate

DAY = 86_400
BINDING_LIFETIME = 90 * DAY


@dataclass
class Account:
    local: str
    onion_pk: bytes
    mailbox_id: bytes
    self_token: bytes
    binding: ServerBinding
    device_list: DeviceList
    device: DeviceSecrets
    identity: IdentitySecrets | None = None  # only on a device that holds the UIK
    #: The profile this device last published for the user (``onionpost profile set``), and
    #: its card (the same without the avatar) that rides in every message sent from here.
    profile: Profile | None = None
    profile_card: Profile | None = None

    @property
    def address(self) -> Address:
        return Address(self.local, onion_from_public_key(self.onion_pk))

    @property
    def uik_pk(self) -> bytes:
        return self.device_list.uik_pk

    def sender_keys(self) -> SenderKeys:
        d = self.device
        return SenderKeys(
            self.local, self.onion_pk, self.uik_pk, d.device_id, d.dsk_seq, d.dsk_seed
        )

    def credentials(self) -> bytes:
        return SenderCredentials(self.binding, self.device_list, tuple(self.device.chain)).encode()

    def prekey_secrets(self) -> list[tuple[int, bytes, bytes]]:
        """``(spk_id, secret, public)`` of every prekey this device still holds."""
        return [(p.spk_id, p.secret, p.public) for p in self.device.prekeys]

    def sign(self, message: bytes) -> bytes:
        return ed25519_sign(self.device.dsk_seed, message)

    def key_update(self) -> KeyUpdate:
        """Everything this device can publish about itself (the inbox ignores what it has)."""
        return KeyUpdate(
            device_list=None,
            binding=None,
            rotations=list(self.device.chain),
            prekeys=[self.device.signed_prekey()],
        )

    def other_device_ids(self) -> list[bytes]:
        return [
            d.device_id for d in self.device_list.devices if d.device_id != self.device.device_id
        ]


def create_identity(
    local: str,
    device_name: str,
    *,
    onion_pk: bytes,
    sek_id: int,
    sek_pk: bytes,
    now: int,
    prekey_lifetime: int = 7 * DAY,
    rng: RandomSource = system_random,
) -> Account:
    """A new identity (UIK) with its first device, bound to an inbox's mailbox."""
    identity = IdentitySecrets.generate(local, now, rng=rng)
    device = DeviceSecrets.generate(device_name, now, prekey_lifetime=prekey_lifetime, rng=rng)
    device_list = DeviceList(identity.uik_pk, 1, now, (device.entry(now),)).signed(
        identity.uik_seed
    )
    mailbox_id = rng(16)
    binding = ServerBinding(
        identity.uik_pk,
        onion_pk,
        mailbox_id,
        local,
        sek_id,
        sek_pk,
        now,
        now + BINDING_LIFETIME,
    ).signed(identity.uik_seed)
    return Account(local, onion_pk, mailbox_id, rng(32), binding, device_list, device, identity)


def add_device(
    primary: Account, device_name: str, *, now: int, rng: RandomSource = system_random
) -> Account:
    """A new device for the same identity; ``primary`` must hold the UIK.

    The primary's device list is advanced to the new version (publish it from the primary).
    """
    if primary.identity is None:
        raise UsageError("Only a device holding the identity key can add devices.")
    device = DeviceSecrets.generate(device_name, now, rng=rng)
    old = primary.device_list
    device_list = DeviceList(
        old.uik_pk, old.version + 1, now, (*old.devices, device.entry(now)), old.revoked
    ).signed(primary.identity.uik_seed)
    primary.device_list = device_list
    return Account(
        primary.local,
        primary.onion_pk,
        primary.mailbox_id,
        primary.self_token,
        primary.binding,
        device_list,
        device,
        None,
    )


def revoke_device(primary: Account, device_id: bytes, *, now: int) -> DeviceList:
    """A new device list without ``device_id``, which is listed as revoked from ``now``."""
    if primary.identity is None:
        raise UsageError("Only a device holding the identity key can revoke devices.")
    if device_id == primary.device.device_id:
        raise UsageError("A device cannot revoke itself; revoke it from another device.")
    old = primary.device_list
    if old.device(device_id) is None:
        raise UsageError("There is no such active device.")
    device_list = DeviceList(
        old.uik_pk,
        old.version + 1,
        now,
        tuple(d for d in old.devices if d.device_id != device_id),
        (*old.revoked, RevokedDevice(device_id, now)),
    ).signed(primary.identity.uik_seed)
    primary.device_list = device_list
    return device_list


def refresh_device_entry(primary: Account, *, now: int) -> DeviceList:
    """Re-sign the device list so it names this device's current (rotated) key."""
    if primary.identity is None:
        raise UsageError("Only a device holding the identity key can sign a device list.")
    old = primary.device_list
    entry = primary.device.entry(now)
    devices = tuple(
        replace(entry, added_at=d.added_at) if d.device_id == entry.device_id else d
        for d in old.devices
    )
    primary.device_list = DeviceList(old.uik_pk, old.version + 1, now, devices, old.revoked).signed(
        primary.identity.uik_seed
    )
    return primary.device_list


def check_display_name(name: str) -> str:
    """A display name as a person typed it, checked: 1 to 64 bytes of UTF-8 on one line, with
    nothing that :func:`~onionpost.core.crypto.keys.shown_name` would remove (so what is signed is
    what contacts see)."""
    cleaned = shown_name(name)
    if not cleaned:
        raise UsageError("A display name must not be empty (use `onionpost profile clear`).")
    if cleaned != name.strip():
        raise UsageError(
            "A display name must be on one line, without control or text-direction characters."
        )
    if len(cleaned.encode("utf-8")) > MAX_NAME_BYTES:
        raise UsageError(f"A display name is at most {MAX_NAME_BYTES} bytes of UTF-8.")
    return cleaned


def sign_profile(
    account: Account,
    *,
    display_name: str,
    avatar_type: str,
    avatar: bytes,
    now: int,
    previous: Profile | None = None,
) -> tuple[Profile, Profile]:
    """Sign a profile for the user and its card (the same without the avatar); the account
    must hold the UIK.  ``issued_at`` is after ``previous``'s (the published one), so every
    contact takes the new profile as the newer one even if this device's clock is behind.

    The display name and avatar are expected checked (:func:`check_display_name`,
    ``onionpost.device.avatar``); an empty name with no avatar is the signed "no profile" that
    ``profile clear`` publishes, so contacts that knew the old name forget it.
    """
    if account.identity is None:
        raise UsageError(
            "This device does not hold your identity key, so it cannot sign your profile. "
            "Run the command on one of your devices that does."
        )
    issued_at = max(now, previous.issued_at + 1 if previous is not None else 0)
    profile = Profile(account.uik_pk, issued_at, display_name, avatar_type, avatar)
    seed = account.identity.uik_seed
    return profile.signed(seed), profile.card().signed(seed)
