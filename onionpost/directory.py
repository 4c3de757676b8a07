"""Finding a recipient's keys: fetch fresh, verify against what we pinned, fall back to cache.

Before sealing, the sender fetches the recipient's bundle from the recipient's own onion (the
address is the onion key, so the fetch itself is authenticated by tor), verifies it against
the contact's pin, and caches it.  When the recipient's inbox is unreachable, the cached
bundle is used if its prekeys are within the grace period.  A changed identity key is never
accepted silently: it is recorded and the send fails until the user accepts the new key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from onionpost.address import Address
from onionpost.api.client import InboxClient
from onionpost.api.transport import Dialer
from onionpost.crypto.bundle import KeyBundle, Pin, VerifiedBundle, verify_bundle
from onionpost.crypto.sender import pin_encode, pin_parse
from onionpost.errors import (
    DeliveryError,
    IdentityKeyChanged,
    PermanentDeliveryError,
    TemporaryDeliveryError,
    TorError,
)
from onionpost.store.contacts import ContactStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolved:
    bundle: VerifiedBundle
    fresh: bool


class Directory:
    def __init__(
        self,
        contacts: ContactStore,
        dialer: Dialer,
        *,
        prekey_grace: int,
        onion_port: int = 80,
        timeout: float = 90.0,
    ) -> None:
        self.contacts = contacts
        self.dialer = dialer
        self.prekey_grace = prekey_grace
        self.onion_port = onion_port
        self.timeout = timeout

    def client(self, address: Address, role: str) -> InboxClient:
        return InboxClient(
            self.dialer,
            address.onion,
            port=self.onion_port,
            isolation=f"{role}:{address.onion}",
            timeout=self.timeout,
        )

    async def resolve(self, address: Address, *, now: int) -> Resolved:
        """The recipient's verified keys; raises DeliveryError (temporary or permanent)."""
        key = str(address)
        contact = self.contacts.get(key)
        pin = pin_parse(contact.pin) if contact else None
        try:
            raw = await self.client(address, "bundle").bundle(address.local)
        except PermanentDeliveryError:
            raise
        except (DeliveryError, TorError) as exc:
            if contact is None or contact.bundle is None:
                raise TemporaryDeliveryError(
                    f"Cannot fetch {address}'s keys ({exc}) and none are cached yet.",
                    code=exc.code,
                ) from exc
            log.info("using cached keys for %s: %s", address, exc)
            return Resolved(self._cached(address, contact.bundle, pin, now), fresh=False)
        bundle = KeyBundle.parse(raw)
        try:
            verified = verify_bundle(
                bundle, onion_pk=address.onion_public_key, local=address.local, now=now, pin=pin
            )
        except IdentityKeyChanged:
            if contact is not None:
                self.contacts.record_identity_change(
                    key, contact.uik_pk, bundle.device_list.uik_pk, now
                )
            raise
        display = bundle.profile.display_name if bundle.profile else None
        self.contacts.remember(
            key,
            uik_pk=verified.uik_pk,
            pin=pin_encode(verified.pin),
            now=now,
            device_list=verified.device_list.encode(),
            bundle=raw,
            display_name=display,
        )
        return Resolved(verified, fresh=True)

    def _cached(self, address: Address, raw: bytes, pin: Pin | None, now: int) -> VerifiedBundle:
        # The pin may have advanced past the cached bundle (a newer device list arrived in a
        # message); the cache is still the best we have, so only the identity is enforced.
        identity_only = Pin(pin.uik_pk, 0, b"", {}) if pin else None
        return verify_bundle(
            KeyBundle.parse(raw),
            onion_pk=address.onion_public_key,
            local=address.local,
            now=now,
            pin=identity_only,
            prekey_grace=self.prekey_grace,
        )
