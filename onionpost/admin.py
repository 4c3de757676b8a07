"""What the CLI's management commands do, without click: queue, contacts, devices, sending.

The commands work on the data directory's databases directly (SQLite lets the running node
and the CLI share them safely) and then poke the node (SIGUSR1) so it acts at once.  Changes
that must reach the inbox (a revoked device) go through the running node's API when it runs,
or straight into the inbox database when it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from onionpost.account import Account, revoke_device
from onionpost.address import Address
from onionpost.api.client import InboxClient
from onionpost.config import Config
from onionpost.crypto.fingerprint import fingerprint, safety_number
from onionpost.crypto.keys import DeviceEntry, DeviceList
from onionpost.errors import NotInitialized, OnionpostError, UsageError
from onionpost.keystore import AccountFiles, KeyStore
from onionpost.pairing import Code
from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
from onionpost.store.contacts import Contact, ContactStore
from onionpost.store.db import Database
from onionpost.store.outbox import OutboxStore
from onionpost.store.submissions import SubmissionStore
from onionpost.wire import KeyUpdate


@dataclass(frozen=True)
class QueueItem:
    id: str
    user: str
    recipient: str
    stage: str  # "waiting for keys" | "in the outbox"
    created_at: int
    attempts: int
    next_attempt_at: int
    last_error: str | None
    state: str


class Local:
    """The data directory of this machine, opened for management."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = KeyStore(config.data_dir)
        self.files = AccountFiles(self.keys)
        self._dbs: list[Database] = []

    def device_db(self) -> Database:
        path = self.config.data_dir / "device.db"
        if not path.exists():
            raise NotInitialized()
        db = Database(path, DEVICE_COMPONENTS)
        self._dbs.append(db)
        return db

    def inbox_db(self) -> Database | None:
        path = self.config.data_dir / "inbox.db"
        if not path.exists():
            return None
        db = Database(path, INBOX_COMPONENTS)
        self._dbs.append(db)
        return db

    def account(self, user: str | None) -> Account:
        users = self.files.users()
        if not users:
            raise NotInitialized()
        if user is None:
            if len(users) > 1:
                raise UsageError(f"Say which user with --user ({', '.join(users)}).")
            user = users[0]
        if user not in users:
            raise UsageError(f"There is no user '{user}' here ({', '.join(users)}).")
        return self.files.load(user)

    def close(self) -> None:
        for db in self._dbs:
            db.close()


@contextlib.contextmanager
def opened(config: Config) -> Iterator[Local]:
    local = Local(config)
    try:
        yield local
    finally:
        local.close()


def running_node(data_dir: Path) -> dict[str, object] | None:
    """The running node's status, or None when no node runs for this data directory."""
    try:
        info = json.loads((data_dir / "run" / "status.json").read_text())
        pid = int(info.get("pid", 0))
        os.kill(pid, 0)
    except (OSError, ValueError, TypeError):
        return None
    if time.time() - float(info.get("updated_at", 0)) > 30:
        return None
    return dict(info)


def poke(data_dir: Path) -> bool:
    """Ask the running node to look at its queues now (SIGUSR1)."""
    info = running_node(data_dir)
    if info is None:
        return False
    with contextlib.suppress(OSError, ValueError, TypeError):
        os.kill(int(str(info["pid"])), signal.SIGUSR1)
        return True
    return False


# --- queue --------------------------------------------------------------------------------------


def queue(local: Local) -> list[QueueItem]:
    items: list[QueueItem] = []
    subs = SubmissionStore(local.device_db())
    for r in subs.listing():
        if r.state == "pending":
            items.append(
                QueueItem(
                    f"s{r.submission_id}",
                    r.user,
                    r.address,
                    "waiting for keys",
                    r.created_at,
                    r.attempts,
                    r.next_attempt_at,
                    r.last_error,
                    r.state,
                )
            )
    db = local.inbox_db()
    if db is not None:
        users = {a.mailbox_id: a.local for a in (local.files.load(u) for u in local.files.users())}
        for row in OutboxStore(db).rows():
            items.append(
                QueueItem(
                    f"o{row.id}",
                    users.get(row.mailbox_id, "?"),
                    row.destination,
                    "in the outbox",
                    row.created_at,
                    row.attempts,
                    row.next_attempt_at,
                    row.last_error,
                    row.state,
                )
            )
    return sorted(items, key=lambda i: i.created_at)


def _parse_id(item: str) -> tuple[str, int]:
    item = item.strip()
    kind, number = item[:1].lower(), item[1:]
    if kind not in ("s", "o") or not number.isdigit():
        raise UsageError(
            f"'{item}' is not a queue id; ids look like o12 or s3 (see onionpost queue)."
        )
    return kind, int(number)


def queue_retry(local: Local, item: str | None) -> int:
    now = int(time.time())
    n = 0
    if item is None or item[:1].lower() == "s":
        sid = _parse_id(item)[1] if item else None
        n += SubmissionStore(local.device_db()).retry_now(now, sid)
    if item is None or item[:1].lower() == "o":
        db = local.inbox_db()
        if db is not None:
            oid = _parse_id(item)[1] if item else None
            n += OutboxStore(db).retry_now(now, oid)
    if item is not None and n == 0:
        raise UsageError(f"Nothing to retry for '{item}': it is not waiting in the queue.")
    poke(local.config.data_dir)
    return n


def queue_cancel(local: Local, item: str) -> None:
    kind, number = _parse_id(item)
    if kind == "s":
        done = SubmissionStore(local.device_db()).cancel(number) > 0
    else:
        db = local.inbox_db()
        done = db is not None and OutboxStore(db).cancel(number, now=int(time.time()))
    if not done:
        raise UsageError(
            f"'{item}' cannot be cancelled: it is not waiting (it may have been delivered)."
        )


# --- contacts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContactView:
    contact: Contact
    fingerprint: str
    safety_number: str


def contacts(local: Local, user: str | None = None) -> list[ContactView]:
    me = local.account(user)
    store = ContactStore(local.device_db())
    return [
        ContactView(c, fingerprint(c.uik_pk), safety_number(me.uik_pk, c.uik_pk))
        for c in store.all()
        if c.address != str(me.address)
    ]


def contact(local: Local, address: str, user: str | None = None) -> ContactView:
    key = str(Address.parse(address))
    for view in contacts(local, user):
        if view.contact.address == key:
            return view
    raise UsageError(f"{key} is not among your contacts yet.")


def set_contact(
    local: Local, address: str, *, verified: bool | None = None, blocked: bool | None = None
) -> None:
    key = str(Address.parse(address))
    if not ContactStore(local.device_db()).set_flags(key, verified=verified, blocked=blocked):
        raise UsageError(f"{key} is not among your contacts yet.")


def identity_changes(local: Local) -> list[tuple[str, bytes, bytes, int]]:
    return ContactStore(local.device_db()).pending_identity_changes()


def accept_identity(local: Local, address: str) -> None:
    key = str(Address.parse(address))
    if not ContactStore(local.device_db()).accept_identity(key, int(time.time())):
        raise UsageError(f"{key} has no unconfirmed identity change.")


# --- devices ------------------------------------------------------------------------------------


def find_device(account: Account, device_prefix: str) -> DeviceEntry:
    """A device by (a prefix of) its id or its name."""
    matches = [
        d
        for d in account.device_list.devices
        if d.device_id.hex().startswith(device_prefix.lower()) or d.name == device_prefix
    ]
    if len(matches) != 1:
        raise UsageError(
            f"'{device_prefix}' matches {len(matches)} devices; use more of the id "
            "(onionpost devices lists them)."
        )
    return matches[0]


async def change_devices(
    local: Local,
    user: str | None,
    change: Callable[[Account], DeviceList],
    *,
    say: Callable[[str], None],
) -> Account:
    """Sign a new device list with ``change`` and publish it to the inbox *now*: straight
    into the inbox database when this machine runs the inbox, else over tor."""
    from onionpost.joining import inbox_dialer, latest_device_list, session_for

    account = local.account(user)
    if account.identity is None:
        raise UsageError(
            "This device does not hold your identity key, so it cannot change your device "
            "list. Do it on one of your devices that does."
        )
    if local.inbox_db() is not None:
        change(account)
        _publish_direct(local, account, KeyUpdate(device_list=account.device_list))
    else:
        async with inbox_dialer(local.config, say=say) as dialer:
            client = InboxClient(
                dialer,
                account.address.onion,
                port=local.config.tor.onion_port,
                isolation="enrol",
                timeout=180.0,
            )
            account.device_list = await latest_device_list(account, client)
            change(account)
            await session_for(account, client).publish(KeyUpdate(device_list=account.device_list))
    local.files.save(account)
    poke(local.config.data_dir)
    return account


def revoke(local: Local, device_prefix: str, user: str | None = None) -> Account:
    """Revoke a device by (a prefix of) its id or its name; the inbox refuses it at once."""
    return asyncio.run(
        change_devices(
            local,
            user,
            lambda a: revoke_device(a, find_device(a, device_prefix).device_id, now=_now()),
            say=lambda _: None,
        )
    )


def rename(local: Local, device_prefix: str, name: str, user: str | None = None) -> Account:
    """Give a device another name in the signed device list."""
    if not name.strip() or len(name.encode()) > 64 or any(c in name for c in "\r\n\x00"):
        raise UsageError("A device name must be 1 to 64 bytes long, on one line.")

    def apply(a: Account) -> DeviceList:
        target = find_device(a, device_prefix).device_id
        old = a.device_list
        devices = tuple(replace(d, name=name) if d.device_id == target else d for d in old.devices)
        assert a.identity is not None
        a.device_list = DeviceList(
            old.uik_pk, old.version + 1, _now(), devices, old.revoked
        ).signed(a.identity.uik_seed)
        if target == a.device.device_id:
            a.device.name = name
        return a.device_list

    return asyncio.run(change_devices(local, user, apply, say=lambda _: None))


@dataclass(frozen=True)
class DeviceView:
    entry: DeviceEntry
    this: bool
    last_seen: int | None


def device_views(local: Local, user: str | None = None) -> tuple[Account, list[DeviceView]]:
    """The person's devices with when each last talked to the inbox (when that is known
    here: this machine runs the inbox)."""
    from onionpost.store.enrolment import EnrolmentStore

    account = local.account(user)
    seen: dict[bytes, int] = {}
    db = local.inbox_db()
    if db is not None:
        seen = EnrolmentStore(db).devices_seen(account.mailbox_id)
    elif running_node(local.config.data_dir) is not None:
        # ask the inbox through the running node's tor (never start a tor just to list)
        with contextlib.suppress(OnionpostError, TimeoutError):
            seen = asyncio.run(_seen_over_tor(local, account))
    views = [
        DeviceView(d, d.device_id == account.device.device_id, seen.get(d.device_id))
        for d in account.device_list.devices
    ]
    return account, views


async def _seen_over_tor(local: Local, account: Account) -> dict[bytes, int]:
    from onionpost.joining import inbox_dialer, session_for

    async with asyncio.timeout(60), inbox_dialer(local.config, say=lambda _: None) as dialer:
        client = InboxClient(
            dialer, account.address.onion, port=local.config.tor.onion_port, isolation="enrol"
        )
        return await session_for(account, client).devices_seen()


# --- invites ------------------------------------------------------------------------------------


def invite(
    local: Local,
    name: str,
    *,
    lifetime: int | None,
    quota_bytes: int | None,
    max_devices: int | None,
) -> tuple[Code, int]:
    """An invite code for a new person on this machine's inbox."""
    from onionpost.enrolment import Enrolment
    from onionpost.inbox import Inbox
    from onionpost.store.enrolment import EnrolmentStore
    from onionpost.store.inbox import InboxStore

    db = local.inbox_db()
    if db is None or not local.keys.has_server():
        raise UsageError(
            "This machine runs no inbox: invite people on the machine that does (the Pi)."
        )
    inbox = Inbox(
        store=InboxStore(db),
        outbox=OutboxStore(db),
        secrets=local.keys.load_server(),
        config=local.config.inbox,
    )
    if name.lower() in local.files.users():
        raise UsageError(f"There is already a user '{name.lower()}' here.")
    return Enrolment(inbox, EnrolmentStore(db), local.config.inbox).create_invite(
        name,
        now=_now(),
        lifetime=lifetime,
        quota_bytes=quota_bytes,
        max_devices=max_devices,
    )


def _now() -> int:
    return int(time.time())


def _publish_direct(local: Local, account: Account, update: KeyUpdate) -> None:
    """Install a key update in this machine's inbox database (embedded mode)."""
    from onionpost.inbox import Inbox
    from onionpost.store.inbox import InboxStore

    db = local.inbox_db()
    if db is None:
        raise UsageError(
            "This machine runs no inbox; the change will be published by the node when it "
            "next connects."
        )
    inbox = Inbox(
        store=InboxStore(db),
        outbox=OutboxStore(db),
        secrets=local.keys.load_server(),
        config=local.config.inbox,
    )
    inbox.publish(account.mailbox_id, update, int(time.time()))


# --- sending ------------------------------------------------------------------------------------


def submit(local: Local, user: str | None, recipients: list[Address], message: bytes) -> int:
    """Queue a message as if a mail client had submitted it (durable on return)."""
    from onionpost.submission import queue_submission

    account = local.account(user)
    if not recipients:
        raise UsageError("Give at least one recipient (--to).")
    sid = queue_submission(
        local.device_db(),
        user=account.local,
        recipients=recipients,
        message=message,
        now=int(time.time()),
        lifetime=local.config.delivery.lifetime_seconds,
        own_address=account.address,
    )
    poke(local.config.data_dir)
    return sid
