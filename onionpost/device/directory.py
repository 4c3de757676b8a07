"""Finding a recipient's keys: fetch fresh, verify against what we pinned, fall back to cache.

Before sealing, the sender fetches the recipient's bundle from the recipient's own onion (the
address is the onion key, so the fetch itself is authenticated by tor), verifies it against
the contact's pin, and caches it.  When the recipient's inbox is unreachable, the cached
bundle is used if its prekeys are within the grace period.  A changed identity key is never
accepted silently: it is recorded and the send fails until the user accepts the new key.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from onionpost.base.clock import Clock, SystemClock
from onionpost.core.address import Address
from onionpost.core.crypto.bundle import KeyBundle, Pin, VerifiedBundle, verify_bundle
from onionpost.core.crypto.sender import pin_encode, pin_parse
from onionpost.core.errors import (
    DeliveryError,
    IdentityKeyChanged,
    OnionpostError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
    TorError,
    TorStillConnecting,
)
from onionpost.net.client import InboxClient
from onionpost.net.pool import ConnectionPool, peer_isolation
from onionpost.net.transport import Dialer
from onionpost.store.contacts import ContactStore

log = logging.getLogger(__name__)

#: A pre-warm dials for as long as a delivery's own connect would (InboxClient's
#: connect_timeout): a delivery waiting on it gets its outcome in the same time.
WARM_TIMEOUT = 60.0


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
        clock: Clock | None = None,
        fresh_seconds: float = 60.0,
        failure_seconds: float = 60.0,
        pool: ConnectionPool | None = None,
        prewarm: bool = False,
        local_onion: str | None = None,
    ) -> None:
        self.pool = pool
        self.prewarm = prewarm
        self.local_onion = local_onion  # its mail never leaves this machine: nothing to warm
        self.contacts = contacts
        self.dialer = dialer
        self.prekey_grace = prekey_grace
        self.onion_port = onion_port
        self.timeout = timeout
        self.clock = clock or SystemClock()
        self.fresh_seconds = fresh_seconds
        self.failure_seconds = failure_seconds
        self._fresh: dict[str, tuple[float, Resolved]] = {}
        self._failed: dict[str, tuple[float, OnionpostError]] = {}
        self._inflight: dict[str, asyncio.Future[Resolved]] = {}

    def client(self, address: Address) -> InboxClient:
        """A client for ``address``'s inbox, in the role deliveries use
        (:func:`~onionpost.net.pool.peer_isolation`): a key fetch and the delivery it is for
        share one circuit and, through the pool, one kept-alive connection."""
        return InboxClient(
            self.dialer,
            address.onion,
            port=self.onion_port,
            isolation=peer_isolation(address.onion),
            timeout=self.timeout,
            pool=self.pool,
        )

    def _warm(self, address: Address) -> None:
        """Mail for ``address`` is being sealed with keys already at hand: open the
        connection its delivery will use now, alongside the sealing (only where this node's
        own inbox delivers it, i.e. ``prewarm``)."""
        if self.pool is not None and self.prewarm and address.onion != self.local_onion:
            self.pool.warm(
                address.onion,
                self.onion_port,
                isolation=peer_isolation(address.onion),
                timeout=WARM_TIMEOUT,
            )

    async def resolve(self, address: Address, *, now: int) -> Resolved:
        """The recipient's verified keys; raises DeliveryError (temporary or permanent).

        One network fetch serves every message sealed for the same address within
        ``fresh_seconds`` (a batch of queued mail), concurrent callers share one fetch, and
        after a failed fetch the cached bundle is used at once for ``failure_seconds``
        instead of waiting for tor to give up on an offline inbox again for every message.
        """
        key = str(address)
        clock = self.clock.monotonic
        recent = self._fresh.get(key)
        if recent is not None and clock() - recent[0] < self.fresh_seconds:
            # ... unless the person has accepted a new identity key for the address since
            # (`contacts accept-key`): the bundle of the old key is no one's to seal to now.
            contact = self.contacts.get(key)
            if contact is None or contact.uik_pk == recent[1].bundle.uik_pk:
                self._warm(address)
                return recent[1]
            del self._fresh[key]
        failed = self._failed.get(key)
        if failed is not None and clock() - failed[0] < self.failure_seconds:
            return self._fallback(address, failed[1], now)
        inflight = self._inflight.get(key)
        if inflight is not None:
            return await asyncio.shield(inflight)
        future: asyncio.Future[Resolved] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            result = await self._fetch(address, now)
        except BaseException as exc:
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: callers get it through the await above
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[key]

    async def _fetch(self, address: Address, now: int) -> Resolved:
        key = str(address)
        clock = self.clock.monotonic
        try:
            raw = await self.client(address).bundle(address.local)
        except PermanentDeliveryError:
            raise
        except TorStillConnecting as exc:
            # Our own tor, not the recipient: remember nothing, so the first pass after tor
            # is ready fetches fresh keys instead of replaying this failure for a minute.
            return self._fallback(address, exc, now)
        except (DeliveryError, TorError) as exc:
            self._failed[key] = (clock(), exc)
            return self._fallback(address, exc, now)
        self._failed.pop(key, None)
        contact = self.contacts.get(key)
        pin = pin_parse(contact.pin) if contact else None
        bundle = KeyBundle.parse(raw)
        try:
            verified = verify_bundle(
                bundle, onion_pk=address.onion_public_key, local=address.local, now=now, pin=pin
            )
        except IdentityKeyChanged as exc:
            if contact is None:
                raise
            self._record_change(address, contact.uik_pk, bundle, raw, now)
            raise IdentityKeyChanged(
                f"{key} now presents a different identity key, so nothing was encrypted to "
                f"it. Compare both keys with `onionpost contacts show {key}`, then run "
                f"`onionpost contacts accept-key {key} FINGERPRINT` (the fingerprint they "
                f"read to you) or `onionpost contacts reject-key {key}`, and send again."
            ) from exc
        self.contacts.remember(
            key,
            uik_pk=verified.uik_pk,
            pin=pin_encode(verified.pin),
            now=now,
            device_list=verified.device_list.encode(),
            bundle=raw,
        )
        if verified.profile is not None:
            # Verified against the pinned identity inside verify_bundle; an older profile
            # than the one we know (a stale bundle) does not replace it.
            profile = verified.profile
            self.contacts.set_profile(key, profile.shown_name, profile.issued_at)
        elif verified.profile_problem is not None:
            log.warning("ignored %s's profile: %s", address, verified.profile_problem)
        resolved = Resolved(verified, fresh=True)
        self._fresh[key] = (clock(), resolved)
        return resolved

    def _record_change(
        self, address: Address, old_uik: bytes, bundle: KeyBundle, raw: bytes, now: int
    ) -> None:
        """Record a contact's new identity key with what its bundle proves of it, so that
        ``contacts accept-key`` can pin it.  A bundle that does not verify even against the
        new key is not recorded (it is no one's key); nothing is sent either way."""
        key = str(address)
        new_uik = bundle.device_list.uik_pk
        pending = self.contacts.pending_change(key, new_uik)
        try:
            verified = verify_bundle(
                bundle,
                onion_pk=address.onion_public_key,
                local=address.local,
                now=now,
                pin=pin_parse(pending.new_pin) if pending and pending.new_pin else None,
            )
        except OnionpostError as exc:
            log.warning("%s's inbox served a new identity key that does not verify: %s", key, exc)
            return
        self.contacts.record_identity_change(
            key,
            old_uik,
            new_uik,
            now,
            new_pin=pin_encode(verified.pin),
            device_list=verified.device_list.encode(),
            bundle=raw,
        )

    async def identity_now(self, address: Address, *, now: int) -> bytes | None:
        """The identity key ``address``'s inbox serves now, its bundle verified against the
        onion address alone; pins and caches nothing (accepting an introduction compares it
        with the introduced key before pinning anything).  None when the inbox cannot be
        reached now; a bundle that does not verify raises."""
        try:
            raw = await self.client(address).bundle(address.local)
        except PermanentDeliveryError:
            raise
        except (DeliveryError, TorError) as exc:
            log.info("cannot fetch %s's keys now: %s", address, exc)
            return None
        bundle = KeyBundle.parse(raw)
        verify_bundle(bundle, onion_pk=address.onion_public_key, local=address.local, now=now)
        return bundle.device_list.uik_pk

    def _fallback(self, address: Address, exc: OnionpostError, now: int) -> Resolved:
        """The cached bundle, when the inbox cannot be reached (or a temporary error)."""
        contact = self.contacts.get(str(address))
        if contact is None or contact.bundle is None:
            if isinstance(exc, TorStillConnecting):
                raise TorStillConnecting(f"Cannot fetch {address}'s keys yet: {exc}") from exc
            raise TemporaryDeliveryError(
                f"Cannot fetch {address}'s keys ({exc}) and none are cached yet.",
                code=exc.code,
            ) from exc
        log.info("using cached keys for %s: %s", address, exc)
        pin = pin_parse(contact.pin)
        return Resolved(self._cached(address, contact.bundle, pin, now), fresh=False)

    def forget(self, address: Address) -> None:
        """Drop what is remembered about fetching this address (its keys may have changed)."""
        self._fresh.pop(str(address), None)
        self._failed.pop(str(address), None)

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
