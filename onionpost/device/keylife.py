"""Key lifecycle: when device keys, prekeys, server keys and bindings are renewed.

Pure decisions on the key material (time comes in); the caller saves the result *before*
publishing it (a published prekey whose private half was not saved would make mail
unreadable), and publishing is idempotent, so a crash between the two only repeats work.

Defaults (config ``[keys]``): device signing keys every 30 days, prekeys every 7 days with
retired prekeys kept 60 days (mail sealed to a cached copy still opens, then forward secrecy
takes over), server envelope keys every 30 days, bindings renewed 30 days before they end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from onionpost.base.config import KeysConfig
from onionpost.core.account import BINDING_LIFETIME, Account, refresh_device_entry
from onionpost.core.crypto.keys import ServerBinding, ServerKey, ServerSecrets
from onionpost.core.crypto.primitives import RandomSource, system_random
from onionpost.core.wire import KeyUpdate

DAY = 86_400
RENEW_BINDING_BEFORE = 30 * DAY


@dataclass
class Rotation:
    update: KeyUpdate = field(default_factory=KeyUpdate)
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.changes)


def prekey_lifetime(cfg: KeysConfig) -> int:
    """A prekey stays valid for two rotation periods, so a late rotation never leaves a gap."""
    return 2 * cfg.prekey_rotation_days * DAY


def last_signing_rotation(account: Account) -> int:
    """When this device's signing key last changed (its first key: when it was added)."""
    if account.device.chain:
        return account.device.chain[-1].not_before
    entry = account.device_list.device(account.device.device_id)
    return entry.added_at if entry else 0


def rotate_device(
    account: Account,
    now: int,
    cfg: KeysConfig,
    *,
    rng: RandomSource = system_random,
    force_signing: bool = False,
) -> Rotation:
    """Renew this device's keys that are due; the returned update publishes them."""
    rot = Rotation()
    dev = account.device
    if force_signing or now - last_signing_rotation(account) >= cfg.device_key_rotation_days * DAY:
        dev.rotate_signing_key(now, rng=rng)
        rot.changes.append(f"device signing key rotated (now #{dev.dsk_seq})")
        rot.update.rotations = list(dev.chain)
        if account.identity is not None:
            rot.update.device_list = refresh_device_entry(account, now=now)
        # the current prekey must be signed by the current device key: start a new one
        dev.new_prekey(now, prekey_lifetime(cfg), rng=rng)
        rot.update.prekeys = [dev.signed_prekey()]
    elif now - dev.current_prekey().created_at >= cfg.prekey_rotation_days * DAY:
        dev.new_prekey(now, prekey_lifetime(cfg), rng=rng)
        rot.changes.append("prekey rotated")
        rot.update.prekeys = [dev.signed_prekey()]
    dropped = dev.drop_retired_prekeys(now, cfg.retired_prekey_keep_days * DAY)
    if dropped:
        rot.changes.append(f"{dropped} retired prekey(s) deleted")
    if account.identity is not None and account.binding.not_after - now < RENEW_BINDING_BEFORE:
        rot.update.binding = renew_binding(
            account, account.binding.sek_id, account.binding.sek_pk, now
        )
        rot.changes.append("server binding renewed")
    return rot


def renew_binding(account: Account, sek_id: int, sek_pk: bytes, now: int) -> ServerBinding:
    """A new UIK-signed binding (the inbox countersigns it when it is published)."""
    assert account.identity is not None
    old = account.binding
    return ServerBinding(
        old.uik_pk,
        old.onion_pk,
        old.mailbox_id,
        old.local,
        sek_id,
        sek_pk,
        now,
        now + BINDING_LIFETIME,
    ).signed(account.identity.uik_seed)


def rotate_server(
    secrets: ServerSecrets,
    now: int,
    cfg: KeysConfig,
    *,
    keep_seconds: int,
    rng: RandomSource = system_random,
    force: bool = False,
) -> ServerKey | None:
    """A new server envelope key when the current one is due; old ones kept ``keep_seconds``."""
    new: ServerKey | None = None
    if force or now - secrets.current().created_at >= cfg.server_key_rotation_days * DAY:
        new = secrets.new_server_key(now, rng=rng)
    secrets.drop_retired(now, keep_seconds)
    return new
