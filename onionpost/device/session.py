"""One local user on this device, running: session with the own inbox, sending, receiving.

A :class:`Device` is what the gateway (SMTP/IMAP) and the CLI talk to for a user.  It owns
the device's session with its inbox, the key directory, the sender and the receiver, and a
sync loop that long-polls the inbox so new mail is filed within a fraction of a second of
arriving there.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor

from onionpost.base.aio import cancel_and_wait, foreground
from onionpost.base.clock import Clock, wait_event
from onionpost.base.config import Config, KeysConfig
from onionpost.core.account import Account
from onionpost.core.address import Address
from onionpost.core.crypto.bundle import KeyBundle
from onionpost.core.crypto.keys import DeviceList, Profile, ServerKey
from onionpost.core.crypto.primitives import RandomSource, hash32, system_random
from onionpost.core.dsn import device_change_notice
from onionpost.core.errors import FilingDeferred, OnionpostError
from onionpost.core.retry import DEVICE_SYNC, Backoff
from onionpost.core.wire import KeyUpdate
from onionpost.device.directory import Directory
from onionpost.device.filing import Filer, filing_key
from onionpost.device.keylife import renew_binding, rotate_device
from onionpost.device.sending import Outgoing, Sender, SendReport
from onionpost.device.sync import Receiver
from onionpost.inbox.postoffice import login_message
from onionpost.net.client import DeviceSession, InboxClient
from onionpost.net.pool import ConnectionPool
from onionpost.net.transport import Dialer
from onionpost.store.contacts import ContactStore
from onionpost.store.keystore import AccountFiles

log = logging.getLogger(__name__)

#: Seconds a stopping device gives its last acknowledgement to reach the inbox.
ACK_AT_STOP = 2.0


def device_session(account: Account, client: InboxClient) -> DeviceSession:
    """This device's session with its inbox: logs in with the device key and its chain."""
    return DeviceSession(
        client,
        mailbox_id=account.mailbox_id,
        device_id=account.device.device_id,
        sign=account.sign,
        login_message=lambda ch: login_message(
            account.onion_pk, account.mailbox_id, account.device.device_id, ch
        ),
        rotations=lambda: [r.encode() for r in account.device.chain],
    )


class Device:
    def __init__(
        self,
        account: Account,
        *,
        config: Config,
        filer: Filer,
        contacts: ContactStore,
        accounts: AccountFiles | None,
        dialer: Dialer,
        clock: Clock,
        rng: RandomSource = system_random,
        crypto_pool: Executor | None = None,
        connections: ConnectionPool | None = None,
        prewarm: bool = False,
    ) -> None:
        self.account = account
        self.config = config
        self.filer = filer
        self.contacts = contacts
        self.accounts = accounts
        self.clock = clock
        own = account.address
        # The node's kept connections keep the one to our own inbox alive between the sync's
        # requests (pending, fetch, acknowledge) and the hand-overs: ~5 requests a message.
        self.client = InboxClient(
            dialer,
            own.onion,
            port=config.tor.onion_port,
            isolation=f"own:{own.onion}",
            pool=connections,
        )
        self.session = device_session(account, self.client)
        self.directory = Directory(
            contacts,
            dialer,
            prekey_grace=config.delivery.prekey_grace_seconds,
            onion_port=config.tor.onion_port,
            clock=clock,
            pool=connections,
            prewarm=prewarm,
            local_onion=own.onion,
        )
        self.sender = Sender(
            account=account,
            session=self.session,
            directory=self.directory,
            contacts=contacts,
            lifetime=config.delivery.lifetime_seconds,
            rng=rng,
            crypto_pool=crypto_pool,
        )
        self.receiver = Receiver(
            account=account,
            session=self.session,
            filer=filer,
            contacts=contacts,
            now=clock.now,
            max_bytes=config.inbox.max_envelope_bytes + (1 << 20),
            crypto_pool=crypto_pool,
        )
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    @property
    def address(self) -> Address:
        return self.account.address

    async def publish_keys(self, update: KeyUpdate | None = None) -> None:
        """Send this device's current public keys (and anything else given) to the inbox."""
        signed = await self.session.publish(update or self.account.key_update())
        if signed is not None:  # keep the countersigned copy: it goes out in our credentials
            self.account.binding = signed
            self.save()

    async def send(self, message: bytes, recipients: list[Address], ref: str = "") -> SendReport:
        return await self.sender.send(Outgoing(message, recipients, ref), now=self.clock.now())

    async def sync(self, *, wait: float = 0.0) -> int:
        return await self.receiver.sync_once(wait=wait)

    async def maintain_keys(
        self,
        now: int,
        cfg: KeysConfig,
        *,
        server_key: ServerKey | None,
        rng: RandomSource = system_random,
        force: bool = False,
    ) -> list[str]:
        """Rotate due keys (all of them with ``force``), save them, publish; returns what
        changed (for the log)."""
        rot = rotate_device(self.account, now, cfg, rng=rng, force_signing=force)
        binding = self.account.binding
        if (
            server_key is not None
            and self.account.identity is not None
            and binding.sek_id != server_key.sek_id
        ):
            rot.update.binding = renew_binding(
                self.account, server_key.sek_id, server_key.public, now
            )
            rot.changes.append("server binding moved to the new server key")
        if rot.changed:
            self.save()
            log.info("%s: %s", self.address, "; ".join(rot.changes))
        update = self.account.key_update()
        update.device_list = rot.update.device_list
        update.binding = rot.update.binding
        await self.publish_keys(update)
        return rot.changes

    def save(self) -> None:
        """Write the account's keys back, unless the user was removed meanwhile: a key
        rotation finishing just after ``onionpost users remove`` must not recreate the files
        (the node drops the device once it notices, see ``Node._update_users``)."""
        if self.accounts is not None and self.accounts.exists(self.account.local):
            self.accounts.save(self.account)

    # -- the person's other devices -------------------------------------------------------

    async def refresh_own_devices(self) -> bool:
        """Adopt a newer device list that another of the person's devices published (it
        added or revoked a device); file a notice about it.  True if the list changed."""
        bundle = KeyBundle.parse(await self.client.bundle(self.account.local))
        new = bundle.device_list
        new.verify()
        if new.uik_pk != self.account.uik_pk:
            log.error("%s: the inbox serves a device list of another identity", self.address)
            return False
        return self.adopt_device_list(new, notify=True)

    def adopt_profile(self, profile: Profile | None, card: Profile | None) -> bool:
        """Take over a profile that ``onionpost profile set`` wrote while the node ran (the
        messages sent from here carry its card from now on); an older one is ignored."""
        if profile is None or card is None:
            return False
        old = self.account.profile
        if old is not None and profile.issued_at <= old.issued_at:
            return False
        self.account.profile, self.account.profile_card = profile, card
        log.info("%s: profile of %d now carried in sent mail", self.address, profile.issued_at)
        return True

    def adopt_device_list(self, new: DeviceList, *, notify: bool) -> bool:
        old = self.account.device_list
        if new.version <= old.version:
            return False
        self.account.device_list = new
        self.save()
        added = [d for d in new.devices if old.device(d.device_id) is None]
        revoked = [r for r in new.revoked if not old.is_revoked(r.device_id)]
        log.info(
            "%s: device list version %d (%d added, %d revoked)",
            self.address,
            new.version,
            len(added),
            len(revoked),
        )
        if notify and (added or revoked):
            now = self.clock.now()
            notice = device_change_notice(
                user_address=str(self.address),
                onion_domain=self.address.domain,
                added=[(d.name, d.device_id.hex(), d.added_at) for d in added],
                revoked=[(r.device_id.hex(), r.revoked_at) for r in revoked],
                version=new.version,
                now=now,
            )
            key = hash32(b"onionpost/v1/devices-notice", new.uik_pk, new.version.to_bytes(4, "big"))
            store, user = self.filer.store, self.account.local
            with store.db.transaction():
                if store.record_seen(user, key[:16], now + 60 * 86_400):
                    self.filer.queue(
                        key=filing_key(b"devices", user.encode(), key),
                        user=user,
                        folder="INBOX",
                        message=notice,
                    )
        return True

    # -- background sync ------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._sync_loop(), name=f"sync:{self.account.local}")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
            # The last sync's acknowledgement waits for a list that will not be asked for.
            # Bounded (stopping takes seconds, whatever the link); if it does not go, the
            # inbox offers those messages again and the next sync recognises them.
            try:
                async with asyncio.timeout(ACK_AT_STOP):
                    await self.receiver.flush_acks()
            except (OnionpostError, TimeoutError) as exc:
                log.info("%s: acknowledged at the next start instead (%s)", self.address, exc)
        await self.sender.hand_overs.close()

    def wake(self) -> None:
        """Try the inbox now if the sync loop is waiting out a failure (tor became ready)."""
        self._wake.set()

    async def _sync_loop(self) -> None:
        backoff = Backoff(DEVICE_SYNC)
        while True:
            try:
                self._wake.clear()
                await foreground.yield_to()  # SMTP clients waiting on a 250 go first
                await self.receiver.sync_once(
                    wait=self.config.inbox.longpoll_seconds, ack_with_next=True
                )
                if self.session.inbox_device_list_version > self.account.device_list.version:
                    await self.refresh_own_devices()
                backoff.succeeded()
            except OnionpostError as exc:
                if isinstance(exc, FilingDeferred) and self.filer.sink is None:
                    # Not a failure: the node is starting and its mailbox is not up yet.
                    # What was fetched is queued durably and filed when it comes; the next
                    # sync then acknowledges it to the inbox.
                    log.info("%s It is filed once the mailbox has started.", exc)
                    await self.filer.mailbox_attached()
                    continue
                pause = backoff.failed()
                log.warning("sync with the inbox failed (%s); retrying in %.0f s", exc, pause)
                await wait_event(self.clock, self._wake, pause)
