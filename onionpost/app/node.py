"""The composition root: a running node built from a :class:`~onionpost.base.config.Config`.

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
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from onionpost.base.aio import cancel_and_wait, new_crypto_pool
from onionpost.base.clock import Clock, SystemClock
from onionpost.base.config import Config
from onionpost.base.scheduler import Scheduler
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import RandomSource, system_random
from onionpost.core.errors import (
    ListenError,
    NotInitialized,
    OnionpostError,
    TorError,
    TorStillConnecting,
)
from onionpost.core.retry import TOR_START, Backoff, RetryPolicy
from onionpost.device.filing import Filer
from onionpost.device.keylife import rotate_server
from onionpost.device.session import Device
from onionpost.device.submission import Submissions
from onionpost.inbox.api import InboxServer
from onionpost.inbox.delivery import OutboxWorker
from onionpost.inbox.enrolment import Enrolment
from onionpost.inbox.postoffice import Inbox
from onionpost.net.pool import ConnectionPool
from onionpost.net.tor.process import kill_launched
from onionpost.net.tor.process import preflight as tor_preflight
from onionpost.net.tor.runtime import TorRuntime
from onionpost.net.tor.socks import TorDialer
from onionpost.net.transport import Dialer, DirectDialer
from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS, queue
from onionpost.store.contacts import ContactStore
from onionpost.store.db import Database
from onionpost.store.disk import DiskRoom
from onionpost.store.enrolment import EnrolmentStore
from onionpost.store.filing import FilingStore
from onionpost.store.inbox import InboxStore
from onionpost.store.keystore import (
    ROTATE_REQUEST,
    AccountFiles,
    KeyStore,
    ensure_private_dir,
    write_private,
)
from onionpost.store.outbox import OutboxStore

log = logging.getLogger(__name__)

#: Something started alongside the node (the mail-client gateway): start() returns a stop().
Extension = Callable[["Node"], Awaitable[Callable[[], Awaitable[None]]]]


def delivery_jobs(scheduler: Scheduler, worker: OutboxWorker) -> None:
    """The outbox's job: deliver what is due, every 30 s and whenever a submission wakes it
    (``scheduler.wake("deliver")``).  The node and the integration tests' harness both
    schedule delivery through here, so the tests drive what ships."""
    scheduler.every("deliver", 30, worker.run_due, start_in=1)


def sealing_jobs(
    scheduler: Scheduler, submissions: Submissions, devices: dict[str, Device]
) -> None:
    """The submission queue's jobs: seal what is due (woken by ``scheduler.wake("seal")``
    on every submission) and check how sent mail fared, for the node and the harness."""
    scheduler.every("seal", 30, submissions.process_due, start_in=1)

    async def outcomes() -> None:
        await check_outcomes(submissions, devices)

    scheduler.every("outcomes", 60, outcomes, start_in=10)


async def check_outcomes(submissions: Submissions, devices: dict[str, Device]) -> None:
    """Ask the outbox how each user's mail fared, so delays and bounces reach them."""
    for device in list(devices.values()):
        try:
            await submissions.check_outbox(device)
        except OnionpostError as exc:
            log.info("could not check the outbox for %s: %s", device.address, exc)


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
        self.enrolment: Enrolment | None = None
        self.server: InboxServer | None = None
        self.worker: OutboxWorker | None = None
        #: Kept-alive connections to other inboxes, shared by deliveries and key fetches
        #: (each destination and role its own; closed when the node stops).
        self.connections = ConnectionPool(self.dialer, max_idle=config.delivery.concurrency)
        #: New mail waits while the data directory's disk is nearly full (min_free_mib).
        self.room = DiskRoom(config.data_dir, reserve_mib=config.min_free_mib)
        self.tor: TorRuntime | None = None
        self.devices: dict[str, Device] = {}
        self.filer: Filer | None = None
        #: Opens the devices' fetched envelopes, sized by delivery.crypto_workers.
        self.crypto_pool: ThreadPoolExecutor | None = None
        #: One line about the mailbox server for `onionpost status` (set by the gateway).
        self.mail_server_status: Callable[[], dict[str, Any]] | None = None
        self.submissions: Submissions | None = None
        self.device_db: Database | None = None
        self.gateway_ports: dict[str, int] = {}
        self.scheduler = Scheduler(self.clock)
        self._tor_task: asyncio.Task[None] | None = None
        self._tor_ready = asyncio.Event()
        self._tor_failure: TorError | None = None
        self._tor_problem: str | None = None
        self._tor_progress: tuple[int, str] = (0, "starting tor")
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

    def can_reach_others(self) -> bool:
        """Whether other inboxes can be dialled now: tor is off (loopback routes only) or up."""
        return self.config.tor.mode == "off" or self.tor is not None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, *, wait_for_tor: bool = False) -> None:
        """Start everything.  Tor connects in the background (the gateway and local mail
        work meanwhile, remote deliveries wait); ``wait_for_tor`` returns only once the
        inbox's onion service is published, as tests and the demo want."""
        try:
            await self._start()
            if wait_for_tor and self._tor_task is not None:
                await self.wait_for_tor()
        except BaseException:
            await self.stop()
            raise

    async def wait_for_tor(self) -> None:
        """Until tor is connected and the onion service published (or tor gave up)."""
        await self._tor_ready.wait()
        if self.tor is None:
            raise self._tor_failure or TorError("tor did not start.")

    async def _start(self) -> None:
        cfg = self.config
        self.started_at = self.clock.now()
        self.connections.reopen()
        ensure_private_dir(cfg.data_dir)
        if self.has_inbox:
            await self._start_inbox()
        if cfg.tor.mode != "off":
            await self._start_tor()
        if self.has_gateway:
            await self._start_devices()
        for ext in self.extensions:
            self._stops.append(await ext(self))
        self._schedule()
        self.scheduler.start()
        # Before "ready": `onionpost status` (and whoever waits for that line) finds it.
        await self._write_status()
        log.info(
            "onionpost node ready: %s",
            ", ".join(str(d.address) for d in self.devices.values()) or "inbox only",
        )

    async def _start_inbox(self) -> None:
        cfg = self.config
        if not self.keys.has_server():
            raise NotInitialized()
        secrets = self.keys.load_server()
        db = self._open(cfg.data_dir / "inbox.db", INBOX_COMPONENTS, secrets.record_key())
        self.inbox = Inbox(
            store=InboxStore(db),
            outbox=OutboxStore(db),
            secrets=secrets,
            config=cfg.inbox,
            rng=self.rng,
            room=self.room,
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
            can_reach_others=self.can_reach_others,
            pool=self.connections,
        )
        self.enrolment = Enrolment(self.inbox, EnrolmentStore(db), cfg.inbox, rng=self.rng)
        self.server = InboxServer(
            self.inbox,
            config=cfg.inbox,
            clock=self.clock,
            on_inbound=self._note_inbound,
            on_submitted=lambda: self.scheduler.wake("deliver"),
            enrolment=self.enrolment,
        )
        try:
            port = await self.server.start(cfg.inbox.listen_host, cfg.inbox.listen_port)
        except OSError as exc:
            raise ListenError.from_os_error(
                exc, cfg.inbox.listen_host, cfg.inbox.listen_port, "[inbox] listen_port"
            ) from exc
        own = Address.for_key("x", secrets.onion_pk).onion
        self.dialer.add(own, "127.0.0.1", port)
        self.inbox.outbox.release_leases()

    async def _start_tor(self) -> None:
        # What waiting cannot fix (no tor program, too old) stops `onionpost run` right here.
        await tor_preflight(self.config.tor)
        self.dialer.fallback = _TorNotReady(self)
        self._tor_task = asyncio.create_task(self._tor_supervisor(), name="tor")

    async def _tor_supervisor(self) -> None:
        """Bring tor up and publish the inbox, retrying with backoff until it works."""
        cfg = self.config
        backoff = Backoff(TOR_START)
        while True:
            try:
                runtime = await TorRuntime.start(
                    cfg.tor, cfg.data_dir, clock=self.clock, on_progress=self._tor_progress_seen
                )
                try:
                    if self.inbox is not None and self.server is not None:
                        onion = await runtime.publish_service(
                            self.inbox.secrets.onion_seed, "127.0.0.1", self.server.port
                        )
                        log.info("inbox onion service published: %s.onion", onion)
                except BaseException:
                    await runtime.stop()
                    raise
            except TorError as exc:
                self._tor_problem = str(exc)
                if not exc.temporary:
                    log.error("tor cannot be used: %s", exc)
                    self._tor_failure = exc
                    self._tor_ready.set()
                    return
                delay = backoff.failed()
                log.warning("tor is not ready (%s); trying again in %.0f s", exc, delay)
                await self.clock.sleep(delay)
                continue
            self._tor_connected(runtime, TorDialer(runtime))
            return

    def _tor_connected(self, runtime: TorRuntime, dialer: Dialer) -> None:
        """Tor is up: dial through it, watch its health, and send what waited for it now
        (the outbox left remote rows alone and the sealing queue did not back off meanwhile,
        so the wake-up alone sends them)."""
        self.tor = runtime
        self._tor_problem = None
        self.dialer.fallback = dialer
        self.scheduler.every("tor-health", 30, runtime.check_health, start_in=30)
        self.scheduler.every("tor-log", 600, runtime.rotate_log, start_in=600)
        self.wake()
        log.info("tor is connected; onionpost is reachable")
        self._tor_ready.set()

    def _tor_progress_seen(self, percent: int, summary: str) -> None:
        self._tor_progress = (percent, summary)
        log.info("tor: %d%% %s", percent, summary)

    async def _start_devices(self) -> None:
        cfg = self.config
        files = AccountFiles(self.keys)
        users = files.users()
        if not users:
            raise NotInitialized()
        # The loop's connection and the group commit's share one write lock (Database).
        self._device_lock = threading.Lock()
        db = self._open(cfg.data_dir / "device.db", DEVICE_COMPONENTS, write_lock=self._device_lock)
        self.device_db = db
        self.filer = Filer(FilingStore(db, cfg.data_dir / "filing"), clock=self.clock)
        self.filer.start()
        for local in users:
            await self._start_device(files, local)
        self.submissions = Submissions(
            db=db,
            filer=self.filer,
            devices=self.devices,
            clock=self.clock,
            config=cfg.delivery,
            unit_random=random.SystemRandom().random,
            max_message_bytes=cfg.gateway.max_message_bytes,
            on_queued=lambda: self.scheduler.wake("seal"),
            sent_copy_wait=cfg.gateway.sent_copy_wait_seconds,
            room=self.room,
            # Its own connection, for the group commit's thread (see Submissions).
            commit_db=self._open(
                cfg.data_dir / "device.db", DEVICE_COMPONENTS, write_lock=self._device_lock
            ),
        )

    # -- periodic jobs --------------------------------------------------------------------

    def _schedule(self) -> None:
        s = self.scheduler
        s.every("status", 5, self._write_status, start_in=5)  # the first before "ready"
        s.every("keys", 3600, self.maintain_keys, start_in=5)
        s.every("prune", 3600, self.prune, start_in=60)
        if self.worker is not None:
            delivery_jobs(s, self.worker)
        if self.submissions is not None:
            sealing_jobs(s, self.submissions, self.devices)
            s.every(
                "refresh",
                self.config.delivery.bundle_refresh_seconds,
                self.refresh_contacts,
                start_in=120,
            )

    async def maintain_keys(self, *, force: bool = False) -> None:
        """Rotate what is due (everything, with ``force``: `onionpost keys rotate`), save it,
        then publish (publishing is idempotent)."""
        now = self.clock.now()
        cfg = self.config.keys
        if self.inbox is not None:
            new = rotate_server(
                self.inbox.secrets,
                now,
                cfg,
                keep_seconds=cfg.server_key_rotation_days * 86_400
                + self.config.delivery.lifetime_seconds
                + 30 * 86_400,
                rng=self.rng,
                force=force,
            )
            self.keys.save_server(self.inbox.secrets)
            if new is not None:
                log.info("server envelope key rotated")
        for device in list(self.devices.values()):
            sek = self.inbox.secrets.current() if self.inbox is not None else None
            await device.maintain_keys(now, cfg, server_key=sek, rng=self.rng, force=force)

    async def prune(self) -> None:
        now = self.clock.now()
        if self.inbox is not None:
            counts = self.inbox.store.prune(now)
            self.inbox.store.prune_prekeys(now - 60 * 86_400)
            self.inbox.outbox.purge_finished(now - 30 * 86_400)
            if self.enrolment is not None:
                self.enrolment.store.prune(now)
            log.debug("pruned: %s", counts)
        if self.filer is not None:
            self.filer.store.prune_seen(now)
        if self.submissions is not None:
            self.submissions.store.purge(now - 30 * 86_400)

    async def refresh_contacts(self) -> None:
        """Keep cached bundles fresh, so sealing works offline with recent keys.

        Each user's contacts through that user's own device: the address books are separate
        (a contact one person blocked is still refreshed for another), and a bundle is
        checked against the pin of the person who will seal with it."""
        now = self.clock.now()
        for device in list(self.devices.values()):
            for contact in device.contacts.all():
                age = now - (contact.bundle_fetched_at or 0)
                if contact.blocked or age < self.config.delivery.bundle_refresh_seconds:
                    continue
                with contextlib.suppress(OnionpostError):
                    await device.directory.resolve(Address.parse(contact.address), now=now)

    async def _start_device(self, files: AccountFiles, local: str) -> None:
        assert self.filer is not None and self.device_db is not None
        if self.crypto_pool is None:
            self.crypto_pool = new_crypto_pool(self.config.delivery.crypto_workers)
        device = Device(
            files.load(local),
            config=self.config,
            filer=self.filer,
            contacts=ContactStore(self.device_db, local),
            accounts=files,
            dialer=self.dialer,
            clock=self.clock,
            rng=self.rng,
            crypto_pool=self.crypto_pool,
            connections=self.connections,
            # This node's own inbox delivers what its devices seal: warm the way there.
            prewarm=self.has_inbox,
        )
        self.devices[local] = device
        with contextlib.suppress(OnionpostError):
            await device.publish_keys()
        device.start()

    def _open(
        self,
        path: Path,
        components: tuple[str, ...],
        record_key: bytes | None = None,
        write_lock: threading.Lock | None = None,
    ) -> Database:
        db = Database(path, components, record_key=record_key, write_lock=write_lock)
        self._dbs.append(db)
        return db

    async def stop(self) -> None:
        """Stop everything in the reverse order of starting, each part promptly.

        Every acknowledged message is already committed, so stopping only ends work in
        progress: running jobs are cancelled and awaited (a delivery cut short keeps its
        lease until the next start releases it), then the gateway, the devices' sync, tor
        and the API server stop, and the databases close last.
        """
        try:
            await self._stop()
        finally:
            for db in self._dbs:  # whatever failed above, no database is left open
                db.close()
            self._dbs.clear()

    async def _stop(self) -> None:
        await self.scheduler.stop()
        await self.connections.close()  # no job runs now: nothing takes a connection any more
        if self._tor_task is not None:
            await cancel_and_wait(self._tor_task)
            self._tor_task = None
        for stop in reversed(self._stops):
            await _bounded(stop(), "the mail-client gateway")
        self._stops.clear()
        if self.submissions is not None:  # a commit in flight ends before its database closes
            await _bounded(self.submissions.close(), "the submission queue")
        # Together: each may give its last acknowledgement a moment to reach the inbox.
        stopped = await asyncio.gather(
            *(device.stop() for device in self.devices.values()), return_exceptions=True
        )
        for failed in stopped:
            if isinstance(failed, BaseException):
                raise failed
        if self.filer is not None:
            await self.filer.stop()
        if self.crypto_pool is not None:  # the devices' sync has stopped: nothing is queued
            self.crypto_pool.shutdown(wait=False, cancel_futures=True)
            self.crypto_pool = None
        for task in self._tasks:
            await cancel_and_wait(task)
        self._tasks.clear()
        if self.tor is not None:
            if not await _bounded(self.tor.stop(), "tor"):
                kill_launched()  # do not leave a launched tor behind
            self.tor = None
        if self.server is not None:
            await _bounded(self.server.stop(), "the node API")
            self.server = None

    def wake(self) -> None:
        """Look at the queues now, and pick up users added or removed by the CLI (SIGUSR1).

        Also called when tor becomes ready: mail that waited for it goes at once, and the
        devices' sync stops waiting out its backoff.
        """
        for job in ("seal", "deliver", "outcomes"):
            self.scheduler.wake(job)
        for local, device in self.devices.items():
            with contextlib.suppress(OnionpostError):
                device.adopt_profile(*AccountFiles(self.keys).load_profile(local))
            device.wake()
        if self.filer is not None:  # `onionpost send` queued a Sent copy
            self.filer.wake()
        request = self.config.data_dir / "run" / ROTATE_REQUEST
        if request.exists():
            request.unlink(missing_ok=True)
            log.info("rotating every key now, as asked (onionpost keys rotate)")
            self._tasks.append(
                asyncio.get_running_loop().create_task(self._rotate_now(), name="rotate")
            )
        if self.has_gateway and self.filer is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._update_users()))

    async def _rotate_now(self) -> None:
        try:
            await self.maintain_keys(force=True)
        except OnionpostError as exc:
            log.warning("rotating the keys did not complete: %s", exc)

    async def _update_users(self) -> None:
        """Serve the users whose files are in the data directory, and only those.

        ``onionpost users add`` writes a user's files and ``users remove`` deletes them (and
        their mail, contacts and mailbox), then both poke the node.  A removed user's device
        is dropped and its sync loop stopped, so nothing keeps polling a mailbox that is gone
        or writes the user's key files back."""
        files = AccountFiles(self.keys)
        present = files.users()
        for local in [u for u in self.devices if u not in present]:
            device = self.devices.pop(local)
            await device.stop()
            log.info("user %s was removed and is no longer served", local)
        for local in present:
            if local not in self.devices and self.filer is not None:
                await self._start_device(files, local)
                log.info("new user %s is served now", local)
            elif local in self.devices:
                # The CLI signed a new device list (devices add/revoke) while we ran: take it
                # over, or our next save would write the old one back.
                with contextlib.suppress(OnionpostError):
                    on_disk = files.load(local).device_list
                    self.devices[local].adopt_device_list(on_disk, notify=False)

    async def run_until(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, which may happen at any moment, even while starting.

        Starting awaits the network (the own inbox, tor's preflight); a stop request must not
        wait for that, so start runs as a task that is cancelled when ``stop`` comes first
        (start then stops whatever it had started).  A start that fails raises its error.
        """
        starting = asyncio.create_task(self.start(), name="start")
        stopping = asyncio.create_task(stop.wait(), name="stop-request")
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stopping before start-up finished")
                await cancel_and_wait(starting)  # start() stops what it had started
                return
            starting.result()  # a failed start raises here (start cleaned up after itself)
            try:
                await stopping
            finally:
                log.info("stopping")
                await self.stop()
        finally:
            stopping.cancel()
            if not starting.done():  # run_until itself was cancelled while starting
                await cancel_and_wait(starting)

    # -- status ---------------------------------------------------------------------------

    def _note_inbound(self) -> None:
        if self.tor is not None:
            self.tor.note_inbound()

    def status(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "role": self.config.role,
            "started_at": self.started_at,
            # Wall-clock time, not self.clock: other processes (onionpost status, the CLI's
            # joining of a running node) compare it with their own time.time() to tell a
            # live node from a stale status file.
            "updated_at": int(time.time()),
            "api_port": self.api_port,
            "gateway": dict(self.gateway_ports),
            "users": [str(d.address) for d in self.devices.values()],
            "tor": self._tor_status(),
        }
        if self.inbox is not None or self.submissions is not None:
            info["queue"] = self.queue_summary()
        if self.filer is not None:
            info["filing"] = self.filer.store.count()
        if self.mail_server_status is not None:
            info["mail_server"] = self.mail_server_status()
        return info

    def queue_summary(self) -> dict[str, int]:
        """Messages not delivered yet, by stage, counted exactly as `onionpost queue` lists
        them (:mod:`onionpost.store.queue`)."""
        return queue.counts(
            self.submissions.store if self.submissions is not None else None,
            self.inbox.outbox if self.inbox is not None else None,
        )

    def _tor_status(self) -> dict[str, Any]:
        if self.tor is not None:
            status: dict[str, Any] = _plain(self.tor.status())
            status["state"] = "running"
            return status
        if self.config.tor.mode == "off":
            return {"mode": "off"}
        percent, summary = self._tor_progress
        failed = self._tor_failure is not None
        return {
            "mode": self.config.tor.mode,
            "state": "failed" if failed else "starting",
            "healthy": False,
            "bootstrap_percent": percent,
            "bootstrap_summary": summary,
            # the address is the inbox's key, known before tor publishes it
            "onion": self._own_onion(),
            "published": False,
            "last_error": str(self._tor_failure) if failed else self._tor_problem,
            "notes": []
            if failed
            else ["tor is still connecting; mail to other inboxes waits until it is"],
        }

    def _own_onion(self) -> str | None:
        if self.inbox is None:
            return None
        return Address.for_key("x", self.inbox.secrets.onion_pk).onion

    async def _write_status(self) -> None:
        path = self.config.data_dir / "run" / "status.json"
        ensure_private_dir(path.parent)
        with contextlib.suppress(OSError):
            write_private(path, json.dumps(self.status(), indent=2).encode())


#: How long one part of the node may take to stop (the API server ends its long-polls, the
#: gateway hangs up on its clients, tor removes the service and exits).  Each is normally a
#: matter of milliseconds; the bound keeps one stuck part from holding up the rest.
PART_STOP_SECONDS = 5.0


async def _bounded(stopping: Awaitable[None], what: str) -> bool:
    """Await one part's stop for at most :data:`PART_STOP_SECONDS`; False if it did not end."""
    try:
        await asyncio.wait_for(stopping, PART_STOP_SECONDS)
    except TimeoutError:
        log.warning("%s did not stop within %.0f s; going on", what, PART_STOP_SECONDS)
        return False
    except Exception as exc:  # stopping goes on whatever one part does
        log.warning("stopping %s failed: %s", what, exc)
    return True


class _TorNotReady:
    """The dialer while tor is still connecting: deliveries wait, uncounted (see
    :class:`~onionpost.core.errors.TorStillConnecting`)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    async def open(
        self, onion: str, port: int, *, isolation: str, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        percent, summary = self._node._tor_progress
        raise TorStillConnecting(
            f"This node's tor is still connecting to the Tor network ({percent}%: {summary}); "
            "the message waits until it is."
        )


def _plain(value: object) -> Any:  # noqa: ANN401
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
