"""One local user on this device, running: session with the own inbox, sending, receiving.

A :class:`Device` is what the gateway (SMTP/IMAP) and the CLI talk to for a user.  It owns
the device's session with its inbox, the key directory, the sender and the receiver, and a
sync loop that long-polls the inbox so new mail is filed within a fraction of a second of
arriving there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from onionpost.account import Account
from onionpost.address import Address
from onionpost.api.client import DeviceSession, InboxClient
from onionpost.api.transport import Dialer
from onionpost.clock import Clock
from onionpost.config import Config, KeysConfig
from onionpost.crypto.keys import ServerKey
from onionpost.crypto.primitives import RandomSource, system_random
from onionpost.directory import Directory
from onionpost.errors import OnionpostError
from onionpost.inbox import login_message
from onionpost.keylife import renew_binding, rotate_device
from onionpost.keystore import AccountFiles
from onionpost.sending import Outgoing, Sender, SendReport
from onionpost.store.contacts import ContactStore
from onionpost.store.mailbox import MailboxStore
from onionpost.sync import Receiver
from onionpost.wire import KeyUpdate

log = logging.getLogger(__name__)


class Device:
    def __init__(
        self,
        account: Account,
        *,
        config: Config,
        mailbox: MailboxStore,
        contacts: ContactStore,
        accounts: AccountFiles | None,
        dialer: Dialer,
        clock: Clock,
        rng: RandomSource = system_random,
    ) -> None:
        self.account = account
        self.config = config
        self.mailbox = mailbox
        self.contacts = contacts
        self.accounts = accounts
        self.clock = clock
        own = account.address
        self.client = InboxClient(
            dialer, own.onion, port=config.tor.onion_port, isolation=f"own:{own.onion}"
        )
        self.session = DeviceSession(
            self.client,
            mailbox_id=account.mailbox_id,
            device_id=account.device.device_id,
            sign=account.sign,
            login_message=lambda ch: login_message(
                account.onion_pk, account.mailbox_id, account.device.device_id, ch
            ),
            rotations=lambda: [r.encode() for r in account.device.chain],
        )
        self.directory = Directory(
            contacts,
            dialer,
            prekey_grace=config.delivery.prekey_grace_seconds,
            onion_port=config.tor.onion_port,
            clock=clock,
        )
        self.sender = Sender(
            account=account,
            session=self.session,
            directory=self.directory,
            contacts=contacts,
            lifetime=config.delivery.lifetime_seconds,
            rng=rng,
        )
        self.receiver = Receiver(
            account=account,
            session=self.session,
            mailbox=mailbox,
            contacts=contacts,
            now=clock.now,
            max_bytes=config.inbox.max_envelope_bytes + (1 << 20),
        )
        mailbox.ensure_user(account.local)
        self._task: asyncio.Task[None] | None = None

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
    ) -> list[str]:
        """Rotate due keys, save them, publish; returns what changed (for the log)."""
        rot = rotate_device(self.account, now, cfg, rng=rng)
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

    # -- background sync ------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._sync_loop(), name=f"sync:{self.account.local}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sync_loop(self) -> None:
        backoff = 1.0
        while True:
            try:
                await self.sync(wait=self.config.inbox.longpoll_seconds)
                backoff = 1.0
            except OnionpostError as exc:
                log.warning("sync with the inbox failed (%s); retrying in %.0f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
