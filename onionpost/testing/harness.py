"""Real inboxes and devices on loopback for integration tests.

Each :class:`InboxNode` is a real inbox (SQLite file, aiohttp server on 127.0.0.1, outbox
worker); each :class:`DeviceNode` is a real device (its own data directory and device.db)
that talks to its inbox over HTTP.  Their queues are driven the way a node drives them: a
:class:`~onionpost.base.scheduler.Scheduler` on the test's clock with the node's own jobs
(:func:`onionpost.app.node.delivery_jobs`, :func:`onionpost.app.node.sealing_jobs`), woken by
submissions as in production; tests that want to step a queue by hand start without them.
They share one :class:`DirectDialer`, which plays the part tor plays in production: it maps
each inbox's onion label to its loopback port.
"""

from __future__ import annotations

import random
import threading
import time
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from types import TracebackType
from typing import Self

from onionpost.app.node import delivery_jobs, sealing_jobs
from onionpost.app.provision import register
from onionpost.base.clock import Clock, FakeClock
from onionpost.base.config import Config, from_mapping
from onionpost.base.scheduler import Scheduler
from onionpost.core.account import Account, add_device, create_identity
from onionpost.core.address import Address
from onionpost.core.crypto.keys import ServerSecrets
from onionpost.core.retry import RetryPolicy
from onionpost.core.wire import KeyUpdate
from onionpost.inbox.api import InboxServer
from onionpost.inbox.delivery import OutboxWorker
from onionpost.inbox.postoffice import Inbox
from onionpost.net.pool import ConnectionPool
from onionpost.net.transport import DirectDialer
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store import INBOX_COMPONENTS as COMPONENTS
from onionpost.store.db import Database
from onionpost.store.inbox import InboxStore
from onionpost.store.keystore import AccountFiles, KeyStore
from onionpost.store.outbox import OutboxStore
from onionpost.testing.mailstore import MemorySink


def test_config(data_dir: Path, **sections: dict[str, object]) -> Config:
    raw: dict[str, object] = {"tor": {"mode": "off"}, "inbox": {"pow_bits": 8}}
    for name, values in sections.items():
        base = raw.get(name)
        raw[name] = {**base, **values} if isinstance(base, dict) else values
    return from_mapping(data_dir, raw)


class InboxNode:
    def __init__(
        self,
        root: Path,
        name: str,
        clock: Clock,
        dialer: DirectDialer,
        *,
        pool: ConnectionPool | None = None,
        **cfg: dict[str, object],
    ) -> None:
        """``pool``: the node's kept-alive connections for deliveries (a node has one);
        None: a connection per request, as most tests want."""
        self.name = name
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.dialer = dialer
        self.config = test_config(self.dir, **cfg)
        keys = KeyStore(self.dir)
        if keys.has_server():  # a restart: same keys, same database
            self.secrets = keys.load_server()
        else:
            self.secrets = ServerSecrets.generate(clock.now())
            keys.save_server(self.secrets)
        self.db = Database(self.dir / "inbox.db", COMPONENTS, record_key=self.secrets.record_key())
        self.inbox = Inbox(
            store=InboxStore(self.db),
            outbox=OutboxStore(self.db),
            secrets=self.secrets,
            config=self.config.inbox,
        )
        self.worker = OutboxWorker(
            outbox=self.inbox.outbox,
            inbox=self.inbox,
            dialer=dialer,
            clock=clock,
            policy=RetryPolicy(60, 3600),
            unit_random=random.Random(1).random,
            pool=pool,
        )
        self.scheduler = Scheduler(clock)
        delivery_jobs(self.scheduler, self.worker)
        self.server = InboxServer(
            self.inbox,
            config=self.config.inbox,
            clock=clock,
            on_submitted=lambda: self.scheduler.wake("deliver"),
        )
        self.onion = Address.for_key("x", self.secrets.onion_pk).onion

    async def start(self, *, worker: bool = True) -> None:
        """Serve the node API; with ``worker``, deliver as a node does (its "deliver" job)."""
        port = await self.server.start("127.0.0.1", 0)
        self.dialer.add(self.onion, "127.0.0.1", port)
        if worker:
            self.inbox.outbox.release_leases()  # as Node._start_inbox does
            self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        await self.server.stop()  # the route stays: peers now find the port closed

    def close(self) -> None:
        self.db.close()

    def provision(self, local: str, device_name: str = "laptop") -> Account:
        now = self.clock.now()
        account = create_identity(
            local,
            device_name,
            onion_pk=self.secrets.onion_pk,
            sek_id=self.secrets.current().sek_id,
            sek_pk=self.secrets.current().public,
            now=now,
        )
        register(self.inbox, account, now=now)
        return account

    def add_device(self, primary: Account, name: str) -> Account:
        now = self.clock.now()
        device = add_device(primary, name, now=now)
        self.inbox.publish(
            primary.mailbox_id,
            KeyUpdate(device_list=primary.device_list, prekeys=[device.device.signed_prekey()]),
            now,
        )
        return device


class DeviceNode:
    """One device of one user, with its own data directory and device database.

    ``account=None`` reopens a device from its files, as a restart would.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        account: Account | None,
        clock: Clock,
        dialer: DirectDialer,
        *,
        connections: ConnectionPool | None = None,
        group_commit: bool = False,
    ) -> None:
        """``connections``: the node's kept-alive ones (to its own inbox and to peers), as
        :class:`~onionpost.app.node.Node` gives its devices; None: a connection per request.
        ``group_commit``: submissions (``submit_async``) are committed as a node commits
        its SMTP clients' (in a thread of their own, on a second connection, sharing
        commits); without it they are committed on the loop, one at a time."""
        from onionpost.device.filing import Filer
        from onionpost.device.session import Device
        from onionpost.device.submission import Submissions
        from onionpost.store.contacts import ContactStore
        from onionpost.store.filing import FilingStore

        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = test_config(self.dir, inbox={"longpoll_seconds": 5.0})
        self.files = AccountFiles(KeyStore(self.dir))
        if account is None:
            account = self.files.load(self.files.users()[0])
        else:
            self.files.save(account)
        lock = threading.Lock() if group_commit else None
        self.db = Database(self.dir / "device.db", DEVICE_COMPONENTS, write_lock=lock)
        self.commit_db = (
            Database(self.dir / "device.db", DEVICE_COMPONENTS, write_lock=lock)
            if group_commit
            else None
        )
        self.sink = MemorySink()
        self.filer = Filer(FilingStore(self.db, self.dir / "filing"), clock=clock, sink=self.sink)
        self.contacts = ContactStore(self.db, account.local)
        self.device = Device(
            account,
            config=self.config,
            filer=self.filer,
            contacts=self.contacts,
            accounts=self.files,
            dialer=dialer,
            clock=clock,
            connections=connections,
        )
        self.submissions = Submissions(
            db=self.db,
            filer=self.filer,
            devices={account.local: self.device},
            clock=clock,
            config=self.config.delivery,
            unit_random=random.Random(2).random,
            max_message_bytes=self.config.gateway.max_message_bytes,
            on_queued=lambda: self.scheduler.wake("seal"),
            commit_db=self.commit_db,
        )
        self.closed = False
        self.scheduler = Scheduler(clock)
        sealing_jobs(self.scheduler, self.submissions, {account.local: self.device})

    def start_jobs(self) -> None:
        """Seal and check outcomes as a node does (its "seal" and "outcomes" jobs); tests
        that step the queue by hand (``submissions.process_due()``) do not call this."""
        self.scheduler.start()

    @property
    def address(self) -> Address:
        return self.device.address

    @property
    def user(self) -> str:
        return self.device.account.local

    def filed(self, folder: str = "INBOX") -> list[bytes]:
        """What the mailbox holds in ``folder``, oldest first, counting what is durably
        queued for it and due (these tests drive no filer loop; nodes run one)."""
        store = self.filer.store
        queued = [
            store.body(f) or store.path(f.key).read_bytes()  # in the database, or a file
            for f in self.filer.store.due(self.device.clock.now(), limit=10_000)
            if f.user == self.user and f.folder == folder
        ]
        return self.sink.messages(self.user, folder) + queued

    async def file_due(self) -> int:
        """Run the filer once (Sent copies and notices are filed by its loop in a node)."""
        return await self.filer.run_due()

    async def close(self) -> None:
        if self.closed:  # a test that restarted or replaced this device closed it already
            return
        self.closed = True
        await self.scheduler.stop()
        await self.submissions.close()
        await self.device.stop()
        self.db.close()
        if self.commit_db is not None:
            self.commit_db.close()


def compose(sender: DeviceNode, to: DeviceNode, subject: str, *, unique: bool = False) -> bytes:
    """A plain message from ``sender`` to ``to``, its Message-ID made from the subject (and,
    ``unique``, a counter: for a test that sends one subject twice)."""
    msg = EmailMessage()
    msg["From"] = str(sender.address)
    msg["To"] = str(to.address)
    msg["Subject"] = subject
    stamp = f".{time.monotonic_ns()}" if unique else ""
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}{stamp}@test>"
    msg.set_content(f"body of {subject}")
    return msg.as_bytes()


def subjects(d: DeviceNode, folder: str = "INBOX") -> list[str]:
    """The subjects of what ``d``'s mailbox holds in ``folder``, oldest first."""
    return [str(message_from_bytes(m, policy=default)["Subject"]) for m in d.filed(folder)]


class Loopback:
    """Inboxes and the devices of the people on them, sharing one fake clock and one dialer.

    The set-up and tear-down every end-to-end test wrote again for itself: a test's world
    subclasses this, adds its inboxes and people in ``__init__``, and its fixture is
    ``async with World(tmp_path) as w: yield w``.  The inboxes run without their outbox
    workers (tests call ``worker.run_due`` when they want delivery); leaving the block closes
    every device and stops and closes every inbox, restarted ones included.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clock = FakeClock(int(time.time()))
        self.dialer = DirectDialer()
        self.inbox_nodes: list[InboxNode] = []
        self.devices: list[DeviceNode] = []
        self._homes: dict[str, InboxNode] = {}  # user -> the inbox that holds their mailbox

    def add_inbox(self, name: str) -> InboxNode:
        node = InboxNode(self.root, name, self.clock, self.dialer)
        self.inbox_nodes.append(node)
        return node

    def add_person(self, inbox: InboxNode, local: str, *, dirname: str = "") -> DeviceNode:
        """A new mailbox ``local`` on ``inbox`` and the device that holds it (in ``dirname``,
        by default named after the user)."""
        d = DeviceNode(self.root, dirname or local, inbox.provision(local), self.clock, self.dialer)
        self.devices.append(d)
        self._homes[local] = inbox
        return d

    def inbox_of(self, d: DeviceNode) -> InboxNode:
        return self._homes[d.user]

    def reopen_inbox(self, old: InboxNode) -> InboxNode:
        """``old`` (stopped and closed) built again from its files, as a restart would."""
        node = InboxNode(self.root, old.name, self.clock, self.dialer)
        self.inbox_nodes[self.inbox_nodes.index(old)] = node
        self._homes = {u: node if i is old else i for u, i in self._homes.items()}
        return node

    async def deliver(self, sender: DeviceNode, *to: DeviceNode) -> None:
        """What the node's schedule would do for mail ``sender`` submitted: seal it, deliver
        it to the recipients' inboxes, let the devices ``to`` fetch it, and let the sender
        see how it went (delivered, or bounced)."""
        await sender.submissions.process_due()
        await self.inbox_of(sender).worker.run_due()
        for d in to:
            await d.device.sync()
        await sender.submissions.check_outbox(sender.device)

    def bounced(self, sender: DeviceNode) -> list[tuple[str | None, str | None]]:
        """``(code, reason)`` of each of ``sender``'s messages that bounced."""
        rows = self.inbox_of(sender).inbox.outbox.rows(states=("bounced",))
        return [(r.last_error_code, r.last_error) for r in rows]

    def reopen_person(self, old: DeviceNode) -> DeviceNode:
        """``old`` (closed) built again from its files, as a restart would."""
        d = DeviceNode(self.root, old.dir.name, None, self.clock, self.dialer)
        self.devices.append(d)
        return d

    async def __aenter__(self) -> Self:
        for node in self.inbox_nodes:
            await node.start(worker=False)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for d in self.devices:
            await d.close()
        for node in self.inbox_nodes:
            await node.stop()
        for node in self.inbox_nodes:
            node.close()


class AliceAndBob(Loopback):
    """The world most end-to-end tests need: alice on inbox A, bob on inbox B."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.a = self.add_inbox("inbox-a")
        self.b = self.add_inbox("inbox-b")
        self.alice = self.add_person(self.a, "alice")
        self.bob = self.add_person(self.b, "bob")
