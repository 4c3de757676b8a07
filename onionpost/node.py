"""The composition root: a running node built from a :class:`~onionpost.config.Config`.

Roles: ``inbox`` (the post office: node API, onion service, outbox), ``gateway`` (devices:
sync, sending, the mail-client gateway) or ``both`` in one process (the default).  Start-up
order matters and is the reverse of shutdown: databases, node API, tor and the onion service,
the outbox worker, devices, the mail-client gateway, the scheduler.  The node writes its
status to ``<data>/run/status.json`` so ``onionpost status`` can report on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from onionpost.account import AccountFiles
from onionpost.address import Address
from onionpost.api.server import InboxServer
from onionpost.api.transport import Dialer, DirectDialer
from onionpost.clock import Clock, SystemClock
from onionpost.config import Config
from onionpost.crypto.primitives import RandomSource, system_random
from onionpost.delivery import OutboxWorker
from onionpost.device import Device
from onionpost.errors import NotInitialized, OnionpostError
from onionpost.inbox import Inbox
from onionpost.keystore import KeyStore, ensure_private_dir, write_private
from onionpost.provision import DEVICE_COMPONENTS
from onionpost.retry import RetryPolicy
from onionpost.store.contacts import ContactStore
from onionpost.store.db import Database
from onionpost.store.inbox import COMPONENTS as INBOX_COMPONENTS
from onionpost.store.inbox import InboxStore
from onionpost.store.mailbox import MailboxStore
from onionpost.store.outbox import OutboxStore
from onionpost.tor import TorDialer, TorRuntime

log = logging.getLogger(__name__)

#: Something started alongside the node (the mail-client gateway): start() returns a stop().
Extension = Callable[["Node"], Awaitable[Callable[[], Awaitable[None]]]]


class Node:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rng: RandomSource = system_random,
        dialer: DirectDialer | None = None,
        extensions: tuple[Extension, ...] = (),
    ) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.rng = rng
        self.keys = KeyStore(config.data_dir)
        self.dialer = dialer or DirectDialer(config.tor.static_routes)
        self.extensions = extensions
        self.inbox: Inbox | None = None
        self.server: InboxServer | None = None
        self.worker: OutboxWorker | None = None
        self.tor: TorRuntime | None = None
        self.devices: dict[str, Device] = {}
        self.mailbox: MailboxStore | None = None
        self.contacts: ContactStore | None = None
        self._dbs: list[Database] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stops: list[Callable[[], Awaitable[None]]] = []
        self.started_at = 0

    @property
    def has_inbox(self) -> bool:
        return self.config.role in ("both", "inbox")

    @property
    def has_gateway(self) -> bool:
        return self.config.role in ("both", "gateway")

    @property
    def api_port(self) -> int:
        return self.server.port if self.server else 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        cfg = self.config
        self.started_at = self.clock.now()
        ensure_private_dir(cfg.data_dir)
        if self.has_inbox:
            await self._start_inbox()
        if cfg.tor.mode != "off":
            await self._start_tor()
        if self.has_gateway:
            await self._start_devices()
        for ext in self.extensions:
            self._stops.append(await ext(self))
        self._tasks.append(asyncio.create_task(self._status_loop(), name="status"))
        log.info(
            "onionpost node ready: %s",
            ", ".join(str(d.address) for d in self.devices.values()) or "inbox only",
        )

    async def _start_inbox(self) -> None:
        cfg = self.config
        if not self.keys.has_server():
            raise NotInitialized()
        secrets = self.keys.load_server()
        db = self._open(cfg.data_dir / "inbox.db", INBOX_COMPONENTS)
        self.inbox = Inbox(
            store=InboxStore(db),
            outbox=OutboxStore(db),
            secrets=secrets,
            config=cfg.inbox,
            rng=self.rng,
        )
        self.worker = OutboxWorker(
            outbox=self.inbox.outbox,
            inbox=self.inbox,
            dialer=self.dialer,
            clock=self.clock,
            policy=RetryPolicy(cfg.delivery.retry_min_seconds, cfg.delivery.retry_max_seconds),
            unit_random=random.SystemRandom().random,
            concurrency=cfg.delivery.concurrency,
            onion_port=cfg.tor.onion_port,
        )
        self.server = InboxServer(
            self.inbox,
            config=cfg.inbox,
            clock=self.clock,
            on_inbound=self._note_inbound,
            on_submitted=self.worker.wake,
        )
        port = await self.server.start(cfg.inbox.listen_host, cfg.inbox.listen_port)
        own = Address.for_key("x", secrets.onion_pk).onion
        self.dialer.add(own, "127.0.0.1", port)
        self._tasks.append(asyncio.create_task(self.worker.run_forever(), name="outbox"))

    async def _start_tor(self) -> None:
        cfg = self.config
        self.tor = await TorRuntime.start(cfg.tor, cfg.data_dir, clock=self.clock)
        self.dialer.fallback = TorDialer(self.tor)
        if self.inbox is not None and self.server is not None:
            onion = await self.tor.publish_service(
                self.inbox.secrets.onion_seed, "127.0.0.1", self.server.port
            )
            log.info("inbox onion service published: %s.onion", onion)

    async def _start_devices(self) -> None:
        cfg = self.config
        files = AccountFiles(self.keys)
        users = files.users()
        if not users:
            raise NotInitialized()
        db = self._open(cfg.data_dir / "device.db", DEVICE_COMPONENTS)
        self.mailbox = MailboxStore(db)
        self.contacts = ContactStore(db)
        for local in users:
            device = Device(
                files.load(local),
                config=cfg,
                mailbox=self.mailbox,
                contacts=self.contacts,
                accounts=files,
                dialer=self.dialer,
                clock=self.clock,
                rng=self.rng,
            )
            self.devices[local] = device
            with contextlib.suppress(OnionpostError):
                await device.publish_keys()
            device.start()

    def _open(self, path: Path, components: tuple[str, ...]) -> Database:
        db = Database(path, components)
        self._dbs.append(db)
        return db

    async def stop(self) -> None:
        for stop in reversed(self._stops):
            with contextlib.suppress(Exception):
                await stop()
        self._stops.clear()
        for device in self.devices.values():
            await device.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.tor is not None:
            with contextlib.suppress(Exception):
                await self.tor.stop()
            self.tor = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        for db in self._dbs:
            db.close()
        self._dbs.clear()

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # -- status ---------------------------------------------------------------------------

    def _note_inbound(self) -> None:
        if self.tor is not None:
            self.tor.note_inbound()

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "role": self.config.role,
            "started_at": self.started_at,
            "updated_at": int(time.time()),
            "api_port": self.api_port,
            "users": [str(d.address) for d in self.devices.values()],
            "tor": _plain(self.tor.status()) if self.tor else {"mode": "off"},
        }
        if self.inbox is not None:
            queued = self.inbox.outbox.rows()
            info["queue"] = {"queued": len(queued)}
        return info

    async def _status_loop(self) -> None:
        path = self.config.data_dir / "run" / "status.json"
        ensure_private_dir(path.parent)
        while True:
            with contextlib.suppress(OnionpostError, OSError):
                write_private(path, json.dumps(self.status(), indent=2).encode())
            await asyncio.sleep(5)


def _plain(value: object) -> Any:  # noqa: ANN401
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


__all__ = ["Dialer", "Node"]
