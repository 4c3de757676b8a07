"""What the CLI's management commands do, without click: queue, contacts, devices, sending.

The commands work on the data directory's databases directly (SQLite lets the running node
and the CLI share them safely) and then poke the node (SIGUSR1) so it acts at once.  Changes
that must reach the inbox (a revoked device) go through the running node's API when it runs,
or straight into the inbox database when it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from onionpost.base.config import Config
from onionpost.core.account import Account, check_display_name, revoke_device, sign_profile
from onionpost.core.address import Address
from onionpost.core.chain import Invitees
from onionpost.core.crypto.bundle import KeyBundle
from onionpost.core.crypto.fingerprint import fingerprint, safety_number
from onionpost.core.crypto.keys import DeviceEntry, DeviceList, Profile
from onionpost.core.errors import FingerprintMismatch, NotInitialized, OnionpostError, UsageError
from onionpost.core.pairing import Code
from onionpost.core.trust import fingerprint_matches, parse_scan, scan_payload
from onionpost.core.wire import KeyUpdate
from onionpost.net.client import InboxClient
from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
from onionpost.store import queue as queue_store
from onionpost.store.contacts import Contact, ContactStore, IdentityChange
from onionpost.store.db import Database
from onionpost.store.introductions import IntroductionStore, StoredIntroduction
from onionpost.store.keystore import (
    ROTATE_REQUEST,
    AccountFiles,
    KeyStore,
    check_user_name,
    ensure_private_dir,
)
from onionpost.store.outbox import OutboxStore
from onionpost.store.queue import QueueItem
from onionpost.store.submissions import SubmissionStore

if TYPE_CHECKING:
    from onionpost.device.introductions import Accepted
    from onionpost.inbox.enrolment import Enrolment
    from onionpost.inbox.postoffice import Inbox
    from onionpost.net.client import DeviceSession

T = TypeVar("T")


class Local:
    """The data directory of this machine, opened for management."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = KeyStore(config.data_dir)
        self.files = AccountFiles(self.keys)
        self._dbs: list[Database] = []
        self._inbox_db: Database | None = None

    def device_db(self) -> Database:
        path = self.config.data_dir / "device.db"
        if not path.exists():
            raise NotInitialized()
        db = Database(path, DEVICE_COMPONENTS)
        self._dbs.append(db)
        return db

    def inbox_db(self) -> Database | None:
        """The inbox database, opened once (one connection: a transaction spanning several
        stores must not wait on a second connection of its own)."""
        if self._inbox_db is not None:
            return self._inbox_db
        path = self.config.data_dir / "inbox.db"
        if not path.exists():
            return None
        key = self.keys.load_server().record_key() if self.keys.has_server() else None
        self._inbox_db = Database(path, INBOX_COMPONENTS, record_key=key)
        self._dbs.append(self._inbox_db)
        return self._inbox_db

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
    from onionpost.device.joining import running_status

    return running_status(data_dir)


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


def _queues(local: Local) -> tuple[SubmissionStore | None, OutboxStore | None]:
    """This machine's submission queue (gateway role) and outbox (inbox role), if it has them."""
    has_device = (local.config.data_dir / "device.db").exists()
    subs = SubmissionStore(local.device_db()) if has_device else None
    db = local.inbox_db()
    if subs is None and db is None:
        raise NotInitialized()
    return subs, OutboxStore(db) if db is not None else None


def queue(local: Local, user: str | None = None) -> list[QueueItem]:
    """Every message not delivered yet (see :mod:`onionpost.store.queue`): ``user``'s, or
    everyone's on this node when ``user`` is None (the USER column tells whose each is)."""
    only = local.account(user).local if user is not None else None
    subs, outbox = _queues(local)
    users = {a.mailbox_id: a.local for a in (local.files.load(u) for u in local.files.users())}
    items = queue_store.waiting(subs, outbox, users)
    return [i for i in items if only is None or i.user == only]


def queue_summary(local: Local) -> dict[str, int]:
    """How many of :func:`queue`'s items are in each stage (what `onionpost status` shows)."""
    return queue_store.counts(*_queues(local))


def queue_outcomes(local: Local, user: str | None = None, *, days: int) -> dict[str, int]:
    """How many left the queue in the last ``days`` days: delivered, bounced, cancelled
    (``user``'s, or everyone's)."""
    only = local.account(user) if user is not None else None
    subs, outbox = _queues(local)
    return queue_store.finished(
        subs,
        outbox,
        since=int(time.time()) - days * 86_400,
        user=only.local if only else None,
        mailbox_id=only.mailbox_id if only else None,
    )


def _parse_id(item: str) -> tuple[str, int]:
    item = item.strip()
    kind, number = item[:1].lower(), item[1:]
    if kind not in ("s", "o") or not number.isdigit():
        raise UsageError(
            f"'{item}' is not a queue id; ids look like o12 or s3 (see onionpost queue)."
        )
    return kind, int(number)


def queue_retry(local: Local, item: str | None, user: str | None = None) -> int:
    """Make one item, or every item (``user``'s only, when given), due now."""
    only = local.account(user) if user is not None else None
    now = int(time.time())
    n = 0
    if item is None or item[:1].lower() == "s":
        sid = _parse_id(item)[1] if item else None
        n += SubmissionStore(local.device_db()).retry_now(
            now, sid, user=only.local if only else None
        )
    if item is None or item[:1].lower() == "o":
        oid = _parse_id(item)[1] if item else None
        db = local.inbox_db()
        if db is not None:
            n += OutboxStore(db).retry_now(now, oid, mailbox_id=only.mailbox_id if only else None)
        if (local.config.data_dir / "device.db").exists():
            # the senders' outcome checks ask about those rows at once, not at the attempt
            # time they last learnt
            SubmissionStore(local.device_db()).outbox_due_now(
                now, oid, user=only.local if only else None
            )
    if item is not None and n == 0:
        whose = f"{only.local}'s queue" if only else "the queue"
        raise UsageError(f"Nothing to retry for '{item}': it is not waiting in {whose}.")
    poke(local.config.data_dir)
    return n


def queue_cancel(local: Local, item: str, user: str | None = None) -> None:
    """Withdraw one item; with ``user``, only if it is that user's mail."""
    only = local.account(user) if user is not None else None
    kind, number = _parse_id(item)
    if kind == "s":
        store = SubmissionStore(local.device_db())
        done = store.cancel(number, user=only.local if only else None) > 0
    else:
        db = local.inbox_db()
        done = db is not None and OutboxStore(db).cancel(
            number, now=int(time.time()), mailbox_id=only.mailbox_id if only else None
        )
    if not done:
        whose = f" in {only.local}'s queue" if only else ""
        raise UsageError(
            f"'{item}' cannot be cancelled: it is not waiting{whose} (it may have been delivered)."
        )


# --- contacts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContactView:
    contact: Contact
    fingerprint: str
    safety_number: str


def contacts(local: Local, user: str | None = None) -> list[ContactView]:
    """``user``'s contacts (each person on a node has their own address book)."""
    me = local.account(user)
    store = ContactStore(local.device_db(), me.local)
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
    local: Local,
    address: str,
    *,
    verified: bool | None = None,
    blocked: bool | None = None,
    user: str | None = None,
) -> None:
    key = str(Address.parse(address))
    store = ContactStore(local.device_db(), local.account(user).local)
    if not store.set_flags(key, verified=verified, blocked=blocked):
        raise UsageError(f"{key} is not among your contacts yet.")


def block(local: Local, address: str, user: str | None = None) -> bool:
    """Block a contact: mark them blocked here and withdraw, at the person's inbox, the
    contact tokens this device registered for them (its own and introductions').  Returns
    whether there was a token to withdraw.  Mail they send later with a proof of work
    reaches the inbox (it cannot tell who a stranger is) and is dropped by this device once
    it has verified the sender."""
    key = str(Address.parse(address))
    account = local.account(user)
    store = ContactStore(local.device_db(), account.local)
    from onionpost.device.introductions import block as block_contact

    # Tokens registered by accepted introductions of them are theirs too (protocol §16).
    found, tokens = block_contact(store, key)
    if not found:
        raise UsageError(f"{key} is not among your contacts yet.")
    now = _now()

    async def withdraw_all(session: DeviceSession) -> None:
        for t in tokens:
            await session.withdraw_token(t)

    def withdraw_direct(inbox: Inbox) -> None:
        for t in tokens:
            inbox.withdraw_token(account.mailbox_id, t, now)

    if tokens:
        asyncio.run(_at_inbox(local, account, direct=withdraw_direct, remote=withdraw_all))
    poke(local.config.data_dir)
    return bool(tokens)


def unblock(local: Local, address: str, user: str | None = None) -> None:
    """Lift a block.  Nothing is restored: the withdrawn token stays withdrawn, so the
    contact's next message is a stranger's (a proof of work, or refused by a contacts-only
    mailbox) until the person writes to them, which grants a fresh token."""
    key = str(Address.parse(address))
    store = ContactStore(local.device_db(), local.account(user).local)
    if not store.unblock(key):
        raise UsageError(f"{key} is not among your contacts yet.")
    # The withdrawn introduction tokens are forgotten too, never registered again.
    IntroductionStore(store.db, store.user).forget(key)
    poke(local.config.data_dir)


def set_policy(local: Local, *, accepts_strangers: bool, user: str | None = None) -> None:
    """Open the person's mailbox to strangers (who pay a proof of work) or make it
    contacts-only, at their inbox; remembered here too, for ``status``."""
    account = local.account(user)
    asyncio.run(
        _at_inbox(
            local,
            account,
            direct=lambda inbox: inbox.set_accepts_strangers(account.mailbox_id, accepts_strangers),
            remote=lambda session: session.set_policy(accepts_strangers=accepts_strangers),
        )
    )
    ContactStore(local.device_db(), account.local).remember_policy(accepts_strangers, _now())


def accepts_strangers(local: Local, user: str | None = None) -> bool | None:
    """Whether the person's mailbox accepts strangers: from the inbox database when this
    machine runs the inbox, else as last set from this device (None: never set here, so
    the inbox's default, which lets strangers write)."""
    account = local.account(user)
    db = local.inbox_db()
    if db is not None:
        from onionpost.store.inbox import InboxStore

        mb = InboxStore(db).mailbox(account.mailbox_id)
        if mb is not None:
            return mb.accepts_strangers
    return ContactStore(local.device_db(), account.local).remembered_policy()


async def _at_inbox(
    local: Local,
    account: Account,
    *,
    direct: Callable[[Inbox], object],
    remote: Callable[[DeviceSession], Awaitable[object]],
) -> None:
    """Change something at the person's inbox *now*: straight in the inbox database when
    this machine runs it, else over tor with a device session (as ``devices revoke``)."""
    if local.inbox_db() is not None:
        direct(_local_inbox(local))
        return
    await _over_tor(local, account, remote)


async def _over_tor(
    local: Local, account: Account, remote: Callable[[DeviceSession], Awaitable[T]]
) -> T:
    """Run ``remote`` with a device session at the person's inbox, over tor (or the
    running node's routes)."""
    from onionpost.device.joining import inbox_dialer
    from onionpost.device.session import device_session

    async with inbox_dialer(local.config, say=lambda _: None) as dialer:
        client = InboxClient(
            dialer,
            account.address.onion,
            port=local.config.tor.onion_port,
            isolation="enrol",
            timeout=180.0,
        )
        return await remote(device_session(account, client))


def identity_changes(local: Local, user: str | None = None) -> list[IdentityChange]:
    """``user``'s pending identity key changes (mail signed by these keys is held)."""
    return ContactStore(local.device_db(), local.account(user).local).pending_identity_changes()


@dataclass(frozen=True)
class KeyChangeView:
    """A pending key change as ``contacts show`` prints it: both keys side by side."""

    change: IdentityChange
    old_fingerprint: str
    new_fingerprint: str
    old_safety_number: str
    new_safety_number: str


def key_changes(local: Local, address: str, user: str | None = None) -> list[KeyChangeView]:
    key = str(Address.parse(address))
    me = local.account(user)
    return [
        KeyChangeView(
            ch,
            fingerprint(ch.old_uik),
            fingerprint(ch.new_uik),
            safety_number(me.uik_pk, ch.old_uik),
            safety_number(me.uik_pk, ch.new_uik),
        )
        for ch in ContactStore(local.device_db(), me.local).changes_of(key)
    ]


def accept_key(local: Local, address: str, typed: str, user: str | None = None) -> IdentityChange:
    """Pin the contact's new identity key if ``typed`` is its fingerprint (see
    :meth:`ContactStore.accept_key`); the running node sends with it from now on."""
    key = str(Address.parse(address))
    store = ContactStore(local.device_db(), local.account(user).local)
    change = store.accept_key(key, typed, _now())
    poke(local.config.data_dir)
    return change


def reject_key(local: Local, address: str, user: str | None = None) -> list[IdentityChange]:
    """Keep the pinned key of ``address``; mail signed by the rejected key is refused."""
    key = str(Address.parse(address))
    store = ContactStore(local.device_db(), local.account(user).local)
    rejected = store.reject_key(key, _now())
    poke(local.config.data_dir)
    return rejected


def own_identity(local: Local, user: str | None = None) -> tuple[Address, str, str]:
    """The person's own address, fingerprint and QR payload (``contacts me``)."""
    account = local.account(user)
    return (
        account.address,
        fingerprint(account.uik_pk),
        scan_payload(account.address, account.uik_pk),
    )


def verify_scanned(local: Local, address: str, scanned: str, user: str | None = None) -> None:
    """Mark ``address`` verified if ``scanned`` (the text of their ``contacts me --qr``)
    names that address and the pinned key; FingerprintMismatch otherwise, and nothing is
    marked."""
    key = str(Address.parse(address))
    scanned_address, scanned_fp = parse_scan(scanned)
    if str(scanned_address) != key:
        raise FingerprintMismatch(
            f"The scanned code is {scanned_address}'s, not {key}'s. Nothing was marked "
            "verified: scan the code on the device of the person you mean to verify."
        )
    store = ContactStore(local.device_db(), local.account(user).local)
    contact = store.get(key)
    if contact is None:
        raise UsageError(f"{key} is not among your contacts yet.")
    if not fingerprint_matches(scanned_fp, contact.uik_pk):
        if any(fingerprint_matches(scanned_fp, ch.new_uik) for ch in store.changes_of(key)):
            raise FingerprintMismatch(
                f"The scanned code matches {key}'s NEW identity key, not the one pinned. "
                f"Nothing was marked verified. If you are sure it is theirs, accept it first "
                f"(onionpost contacts accept-key {key} FINGERPRINT), then scan again."
            )
        raise FingerprintMismatch(
            f"The scanned fingerprint does NOT match the key pinned for {key} "
            f"({fingerprint(contact.uik_pk)}). Nothing was marked verified. The person "
            "showing this code may not be the contact you write with, or their key changed: "
            f"compare with onionpost contacts show {key}."
        )
    store.set_flags(key, verified=True)


# --- introductions ------------------------------------------------------------------------------


def introduce(local: Local, b: str, c: str, user: str | None = None) -> tuple[int, int]:
    """Queue an introduction of ``b`` to ``c`` and of ``c`` to ``b`` (protocol §16); the
    running node seals and sends them like mail.  Returns the two submission ids."""
    from onionpost.device.introductions import introduce as queue_pair

    account = local.account(user)
    db = local.device_db()
    queued = queue_pair(
        db,
        contacts=ContactStore(db, account.local),
        me=account.address,
        uik_pk=account.uik_pk,
        dsk_seed=account.device.dsk_seed,
        b=b,
        c=c,
        now=_now(),
    )
    poke(local.config.data_dir)
    return queued.to_b, queued.to_c


def pending_introductions(local: Local, user: str | None = None) -> list[StoredIntroduction]:
    """Introductions received and not accepted yet, that can still be accepted."""
    account = local.account(user)
    now = _now()
    return [
        i
        for i in IntroductionStore(local.device_db(), account.local).all()
        if i.accepted_at is None and i.expires_at >= now
    ]


def accept_introduction(local: Local, address: str, user: str | None = None) -> Accepted:
    """Accept the pending introduction of ``address``: check the introduced identity key
    against the one their inbox serves (when it can be reached now; else on the first
    fetch), pin it, and register the introduction's token at our inbox."""
    from onionpost.device.directory import Directory
    from onionpost.device.introductions import accept
    from onionpost.device.joining import inbox_dialer

    account = local.account(user)
    db = local.device_db()
    contacts = ContactStore(db, account.local)
    now = _now()

    async def register(token: bytes, label: str) -> None:
        await _at_inbox(
            local,
            account,
            direct=lambda inbox: inbox.store.add_token(
                account.mailbox_id, inbox.token_hash(token), now
            ),
            remote=lambda session: session.register_token(token, label),
        )

    async def run(fetch_uik: Callable[[Address], Awaitable[bytes | None]] | None) -> Accepted:
        return await accept(
            contacts=contacts,
            introductions=IntroductionStore(db, account.local),
            address=address,
            register=register,
            fetch_uik=fetch_uik,
            now=now,
        )

    async def main() -> Accepted:
        if running_node(local.config.data_dir) is None and local.config.tor.mode != "off":
            # No node runs, so no tor to reach their inbox with: starting one for this check
            # alone takes a minute.  The pin is compared at the first fetch instead.
            return await run(None)
        async with inbox_dialer(
            local.config, say=lambda _: None, own_onion=account.address.onion
        ) as dialer:
            directory = Directory(
                contacts,
                dialer,
                prekey_grace=local.config.delivery.prekey_grace_seconds,
                onion_port=local.config.tor.onion_port,
                timeout=60.0,
            )

            async def fetch_uik(who: Address) -> bytes | None:
                return await directory.identity_now(who, now=now)

            return await run(fetch_uik)

    accepted = asyncio.run(main())
    poke(local.config.data_dir)
    return accepted


# --- profile ------------------------------------------------------------------------------------


def profile_set(
    local: Local,
    *,
    name: str | None = None,
    avatar: bytes | None = None,
    no_avatar: bool = False,
    user: str | None = None,
) -> Profile:
    """Sign and publish the person's profile: ``name`` and ``avatar`` (an image file's bytes,
    re-encoded by :mod:`onionpost.device.avatar`) replace the published ones, what is not given
    is kept from the profile the inbox serves now (so a name change keeps the avatar that
    another device set), ``no_avatar`` drops the avatar.  Needs a device holding the
    identity key."""
    account = local.account(user)
    new_name = check_display_name(name) if name is not None else None
    picture: tuple[str, bytes] | None = None
    if avatar is not None:
        from onionpost.device.avatar import process_avatar

        picture = process_avatar(avatar)
    if no_avatar and picture is not None:
        raise UsageError("Give either --avatar or --no-avatar, not both.")

    def make(current: Profile | None) -> tuple[str, str, bytes]:
        display = new_name if new_name is not None else (current.display_name if current else "")
        if not display:
            raise UsageError("Give your display name with --name (you have no profile yet).")
        if picture is not None:
            return display, *picture
        if no_avatar or current is None:
            return display, "", b""
        return display, current.avatar_type, current.avatar

    return asyncio.run(_publish_profile(local, account, make))


def profile_clear(local: Local, user: str | None = None) -> Profile:
    """Publish an empty signed profile: no name, no avatar.  It is newer than the old one,
    so contacts that knew the old name forget it when they next see the new one."""
    return asyncio.run(_publish_profile(local, local.account(user), lambda _current: ("", "", b"")))


def profile_show(local: Local, user: str | None = None) -> Profile | None:
    """The person's published profile: the inbox's copy when this machine runs the inbox,
    else the one this device last published (None: none, or an empty one)."""
    account = local.account(user)
    profile = account.profile
    if local.inbox_db() is not None:
        profile = _published_here(local, account) or profile
    if profile is None or (not profile.display_name and not profile.avatar):
        return None
    return profile


def _published_here(local: Local, account: Account) -> Profile | None:
    from onionpost.store.inbox import InboxStore

    db = local.inbox_db()
    mb = InboxStore(db).mailbox(account.mailbox_id) if db is not None else None
    if mb is None or not mb.profile:
        return None
    return _own_profile(account, mb.profile)


def _own_profile(account: Account, raw: bytes) -> Profile | None:
    """``raw`` as our own profile, if it is one (verifies for our identity)."""
    try:
        profile = Profile.parse(raw)
        profile.verify_for(account.uik_pk)
    except OnionpostError:
        return None
    return profile


async def _publish_profile(
    local: Local, account: Account, make: Callable[[Profile | None], tuple[str, str, bytes]]
) -> Profile:
    """Sign a profile made by ``make`` from the published one and publish it *now*: straight
    into the inbox database when this machine runs the inbox, else over tor with a device
    session.  The device keeps it (and its card, for the mail it sends) in its key files."""
    from onionpost.device.joining import inbox_dialer
    from onionpost.device.session import device_session

    if account.identity is None:
        raise UsageError(
            "This device does not hold your identity key, so it cannot sign your profile. "
            "Run the command on one of your devices that does."
        )
    now = _now()

    def signed(current: Profile | None) -> tuple[Profile, Profile]:
        """The new profile made from ``current`` (the newest published), and its card
        (the same without the avatar, carried in sent mail)."""
        display, media, picture = make(current)
        return sign_profile(
            account,
            display_name=display,
            avatar_type=media,
            avatar=picture,
            now=now,
            previous=current,
        )

    if local.inbox_db() is not None:
        profile, card = signed(_published_here(local, account) or account.profile)
        _publish_direct(local, account, KeyUpdate(profile=profile))
    else:
        async with inbox_dialer(local.config, say=lambda _: None) as dialer:
            client = InboxClient(
                dialer,
                account.address.onion,
                port=local.config.tor.onion_port,
                isolation="enrol",
                timeout=180.0,
            )
            served = KeyBundle.parse(await client.bundle(account.local)).profile
            current = (_own_profile(account, served.encode()) if served else None) or (
                account.profile
            )
            profile, card = signed(current)
            await device_session(account, client).publish(KeyUpdate(profile=profile))
    account.profile, account.profile_card = profile, card
    local.files.save_profile(account)
    poke(local.config.data_dir)
    return profile


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
    from onionpost.device.joining import inbox_dialer, latest_device_list
    from onionpost.device.session import device_session

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
            await device_session(account, client).publish(
                KeyUpdate(device_list=account.device_list)
            )
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
    from onionpost.device.joining import inbox_dialer
    from onionpost.device.session import device_session

    async with asyncio.timeout(60), inbox_dialer(local.config, say=lambda _: None) as dialer:
        client = InboxClient(
            dialer, account.address.onion, port=local.config.tor.onion_port, isolation="enrol"
        )
        return await device_session(account, client).devices_seen()


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyRow:
    what: str
    detail: str
    created_at: int | None
    next_at: int | None


def key_rows(local: Local, user: str | None = None) -> list[KeyRow]:
    """This machine's keys, their ages and when each rotates next (the node rotates them)."""
    from onionpost.core.crypto.fingerprint import fingerprint
    from onionpost.device.keylife import last_signing_rotation

    cfg = local.config.keys
    day = 86_400
    rows: list[KeyRow] = []
    users = local.files.users()
    for name in [user] if user else users:
        account = local.account(name)
        who = f"{account.address.local}: "
        if account.identity is not None:
            rows.append(
                KeyRow(
                    who + "identity key (held here)",
                    fingerprint(account.uik_pk),
                    account.identity.created_at,
                    None,
                )
            )
        else:
            rows.append(KeyRow(who + "identity key", "not on this device", None, None))
        dev = account.device
        last = last_signing_rotation(account)
        rows.append(
            KeyRow(
                who + f"device signing key #{dev.dsk_seq}",
                dev.name,
                last,
                last + cfg.device_key_rotation_days * day,
            )
        )
        current = dev.current_prekey()
        rows.append(
            KeyRow(
                who + f"prekey {current.spk_id}",
                f"{len(dev.prekeys) - 1} retired kept",
                current.created_at,
                current.created_at + cfg.prekey_rotation_days * day,
            )
        )
        rows.append(
            KeyRow(
                who + "server binding",
                f"server key {account.binding.sek_id}",
                account.binding.issued_at,
                account.binding.not_after - 30 * day,
            )
        )
    if local.keys.has_server():
        secrets = local.keys.load_server()
        sek = secrets.current()
        rows.append(
            KeyRow(
                f"inbox: server envelope key {sek.sek_id}",
                f"{len(secrets.server_keys) - 1} retired kept",
                sek.created_at,
                sek.created_at + cfg.server_key_rotation_days * day,
            )
        )
    return rows


def request_rotation(local: Local) -> bool:
    """Ask the running node to rotate every key now; False if no node runs."""
    if running_node(local.config.data_dir) is None:
        return False
    path = ensure_private_dir(local.config.data_dir / "run") / ROTATE_REQUEST
    path.write_bytes(b"")
    return poke(local.config.data_dir)


# --- invites ------------------------------------------------------------------------------------


def invite(
    local: Local,
    name: str,
    *,
    lifetime: int | None,
    quota_bytes: int | None,
    max_devices: int | None,
    can_invite: int = 0,
    user: str | None = None,
) -> tuple[Code, int]:
    """An invite code for a new person on this machine's inbox (as its admin: no limit on
    invites), or, on a machine without the inbox, one the person's inbox mints for them,
    paid from their allowance in the invite chain."""
    if local.inbox_db() is None or not local.keys.has_server():
        return _invite_remote(
            local,
            name,
            lifetime=lifetime,
            quota_bytes=quota_bytes,
            max_devices=max_devices,
            can_invite=can_invite,
            user=user,
        )
    if name.lower() in local.files.users():
        raise UsageError(f"There is already a user '{name.lower()}' here.")
    return _enrolment(local).create_invite(
        name,
        now=_now(),
        lifetime=lifetime,
        quota_bytes=quota_bytes,
        max_devices=max_devices,
        can_invite=can_invite,
    )


def _invite_remote(
    local: Local,
    name: str,
    *,
    lifetime: int | None,
    quota_bytes: int | None,
    max_devices: int | None,
    can_invite: int,
    user: str | None,
) -> tuple[Code, int]:
    account = _member(local, user)
    check_user_name(name.lower())
    text, expires = asyncio.run(
        _over_tor(
            local,
            account,
            lambda session: session.invite(
                name.lower(),
                can_invite=can_invite,
                quota_bytes=quota_bytes,
                max_devices=max_devices,
                lifetime=lifetime,
            ),
        )
    )
    code = Code.parse(text, "invite")
    if code.onion != account.address.onion:
        raise UsageError("Your inbox answered with an invite for another inbox; not shown.")
    return code, expires


def _member(local: Local, user: str | None) -> Account:
    """The person on this machine who acts in the invite chain (their inbox is elsewhere)."""
    if not local.files.users():
        raise UsageError(
            "This machine holds no inbox and nobody's keys: invite people on the machine "
            "that runs the inbox (the Pi), or from a machine set up with `init --invite`."
        )
    return local.account(user)


def _enrolment(local: Local) -> Enrolment:
    """This machine's inbox's enrolment (invites and the invite chain)."""
    from onionpost.inbox.enrolment import Enrolment
    from onionpost.store.enrolment import EnrolmentStore

    inbox = _local_inbox(local)
    return Enrolment(inbox, EnrolmentStore(inbox.store.db), local.config.inbox)


@dataclass(frozen=True)
class TreeRow:
    """One person in ``users tree``: ``invited_by`` None is the inbox's admin; for the admin's
    own row (``user`` None) ``remaining`` is None: unlimited."""

    depth: int
    user: str | None
    invited_by: str | None
    remaining: int | None
    quota_bytes: int | None
    max_devices: int | None


def tree(local: Local, user: str | None = None) -> list[TreeRow]:
    """The invite chain: the whole of it on the inbox machine (the admin's view), else the
    person and the people below them, as their inbox tells."""
    if local.inbox_db() is None or not local.keys.has_server():
        account = _member(local, user)
        rows = asyncio.run(_over_tor(local, account, lambda session: session.chain()))
        out = []
        for r in rows:
            try:
                out.append(
                    TreeRow(
                        int(r["depth"]),
                        str(r["local"]),
                        None if r.get("invited_by") is None else str(r["invited_by"]),
                        int(r["remaining"]),
                        None if r.get("quota_bytes") is None else int(r["quota_bytes"]),
                        None if r.get("max_devices") is None else int(r["max_devices"]),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise UsageError(
                    "Your inbox's answer about the invite chain is not understood."
                ) from exc
        return out
    enrolment = _enrolment(local)
    chain = enrolment.chain(_now())
    default = local.config.inbox.quota_bytes
    out = [TreeRow(0, None, None, None, None, None)]
    for depth, m in chain.below(None):
        up = chain.parent(m.mailbox_id)
        out.append(
            TreeRow(
                depth,
                m.name,
                None if up is None else chain.members[up].name,
                m.remaining,
                m.quota_bytes or default,
                m.max_devices,
            )
        )
    return out


Ask = Callable[[str, list[str]], "Invitees | None"]


def _no_answer(_target: str, _invitees: list[str]) -> Invitees | None:
    return None


def remove_member(
    local: Local,
    name: str,
    invitees: Invitees | None,
    *,
    user: str | None = None,
    ask: Ask = _no_answer,
) -> tuple[list[str], list[str]]:
    """Remove someone below this machine's person in the invite chain, at their inbox
    (checked there against the recorded chain); returns who was removed and who moved up.

    When ``name`` invited people and ``invitees`` is None, ``ask`` is asked what happens to
    them (a terminal prompt; by default nobody answers and the inbox's refusal says which
    option to choose)."""
    account = _member(local, user)
    name = check_user_name(name.lower())

    async def run(session: DeviceSession) -> tuple[list[str], list[str]]:
        choice = invitees
        if choice is None:
            rows = await session.chain()
            below = [str(r.get("local")) for r in rows if r.get("invited_by") == name]
            if below:
                choice = ask(name, below)
        return await session.remove_member(name, choice.value if choice else None)

    return asyncio.run(_over_tor(local, account, run))


def _now() -> int:
    return int(time.time())


def _publish_direct(local: Local, account: Account, update: KeyUpdate) -> None:
    """Install a key update in this machine's inbox database (embedded mode)."""
    _local_inbox(local).publish(account.mailbox_id, update, int(time.time()))


def _local_inbox(local: Local) -> Inbox:
    """This machine's inbox, opened on its database (embedded mode)."""
    from onionpost.inbox.postoffice import Inbox
    from onionpost.store.inbox import InboxStore

    db = local.inbox_db()
    if db is None:
        raise UsageError(
            "This machine runs no inbox; the change will be published by the node when it "
            "next connects."
        )
    return Inbox(
        store=InboxStore(db),
        outbox=OutboxStore(db),
        secrets=local.keys.load_server(),
        config=local.config.inbox,
    )


# --- users --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserUsage:
    """What one person's mailbox uses.  The spool and quota figures are ``None`` when this
    machine runs no inbox (or the inbox has no mailbox for the user)."""

    user: str
    address: str
    devices: int
    spooled_messages: int | None
    spooled_bytes: int | None
    quota_bytes: int | None


def users(local: Local) -> list[UserUsage]:
    """Each user of this node with what their mailbox uses at the inbox."""
    from onionpost.store.inbox import InboxStore

    names = local.files.users()
    if not names and not local.keys.has_server():
        raise NotInitialized()
    db = local.inbox_db()
    store = InboxStore(db) if db is not None else None
    out: list[UserUsage] = []
    for name in names:
        account = local.files.load(name)
        mailbox = store.mailbox(account.mailbox_id) if store is not None else None
        messages = size = quota = None
        if store is not None and mailbox is not None:
            messages, size = store.spooled(account.mailbox_id)
            quota = mailbox.quota_bytes or local.config.inbox.quota_bytes
        out.append(
            UserUsage(
                name,
                str(account.address),
                len(account.device_list.devices),
                messages,
                size,
                quota,
            )
        )
    if store is not None:
        # an inbox-only machine (a Pi): people whose keys live on their own devices
        onion_pk = local.keys.load_server().onion_pk
        for mb in store.mailboxes():
            if mb.local in names:
                continue
            messages, size = store.spooled(mb.mailbox_id)
            out.append(
                UserUsage(
                    mb.local,
                    str(Address.for_key(mb.local, onion_pk)),
                    len(store.devices(mb.mailbox_id)),
                    messages,
                    size,
                    mb.quota_bytes or local.config.inbox.quota_bytes,
                )
            )
    return out


@dataclass(frozen=True)
class Removed:
    """What ``remove_user`` deleted (for the CLI to report)."""

    user: str
    mailbox: bool  # the mailbox in this machine's inbox
    spooled_messages: int
    messages: int  # filed on this device
    contacts: int
    submissions: int
    node_told: bool  # a running node was poked and drops the user
    also_removed: tuple[str, ...] = ()  # people they invited, removed with them
    reparented: tuple[str, ...] = ()  # people they invited, now the admin's


def check_user_exists(local: Local, name: str) -> None:
    """Refuse a name of which nothing is on this machine.  Anything counts, not only a whole
    user: key files, a mailbox in the inbox or a gateway login (an interrupted removal
    leaves some of them, and running the removal again must finish it)."""
    if not user_exists(local, name):
        known = local.files.users()
        here = f" ({', '.join(known)})" if known else ""
        raise UsageError(f"There is no user '{name}' here{here}.")


def user_exists(local: Local, name: str) -> bool:
    from onionpost.store.accounts import AccountStore
    from onionpost.store.inbox import InboxStore

    check_user_name(name)
    if local.keys.has_user_files(name):
        return True
    db = local.inbox_db()
    if db is not None and InboxStore(db).mailbox_by_local(name) is not None:
        return True
    device_db = local.config.data_dir / "device.db"
    return device_db.exists() and name in AccountStore(local.device_db()).users()


def removal_choice(local: Local, name: str, invitees: Invitees | None, ask: Ask) -> Invitees | None:
    """On the inbox machine: ``invitees``, or (when ``name`` invited people and nothing was
    said) ``ask``'s answer; refuses with the options when there is still no answer."""
    if invitees is not None or local.inbox_db() is None or not local.keys.has_server():
        return invitees
    chain = _enrolment(local).chain(_now())
    try:
        target = chain.by_name(name)
    except UsageError:
        return None  # no mailbox here: only local data to remove
    below = [m.name for m in chain.invitees(target.mailbox_id)]
    choice = ask(name, below) if below else None
    if below and choice is None:
        chain.plan_removal(None, target.mailbox_id, None)  # raises, naming the options
    return choice


def remove_user(local: Local, name: str, invitees: Invitees | None = None) -> Removed:
    """Delete a person from this node: mailbox and spool, mail, contacts, queued mail,
    gateway login, key files; then tell the running node, which stops serving them.

    The people they invited are removed with them or re-parented to the admin, as
    ``invitees`` says (refused when they invited people and it says nothing).  Each step is
    idempotent and the key files go last, so an interrupted removal is finished by running
    it again (the user is still listed until then)."""
    from onionpost.store.inbox import InboxStore

    check_user_exists(local, name)
    mailbox_id = local.files.load(name).mailbox_id if local.files.exists(name) else None
    had_mailbox, spooled = False, 0
    also: tuple[str, ...] = ()
    moved: tuple[str, ...] = ()
    db = local.inbox_db()
    if db is not None:
        inbox = InboxStore(db)
        row = inbox.mailbox(mailbox_id) if mailbox_id else inbox.mailbox_by_local(name)
        if row is not None:
            enrolment = _enrolment(local)
            now = _now()
            with db.transaction():
                chain = enrolment.chain(now)
                plan = chain.plan_removal(None, row.mailbox_id, invitees)
                spooled = sum(inbox.spooled(m.mailbox_id)[0] for m in plan.removed)
                plan = enrolment.remove(None, row.local, invitees, now)
            also = tuple(m.name for m in plan.removed[1:])
            moved = tuple(m.name for m in plan.reparented)
            had_mailbox = True
    messages = contacts_gone = submissions = 0
    for who in (name, *also):
        if who != name and not user_exists(local, who):
            continue
        m, c, s = _remove_local_data(local, who)
        messages, contacts_gone, submissions = messages + m, contacts_gone + c, submissions + s
    told = poke(local.config.data_dir)
    return Removed(
        name, had_mailbox, spooled, messages, contacts_gone, submissions, told, also, moved
    )


def _remove_local_data(local: Local, name: str) -> tuple[int, int, int]:
    """A person's mail, contacts, queued mail, gateway account and key files on this
    machine (the key files last)."""
    from onionpost.store.accounts import AccountStore
    from onionpost.store.filing import FilingStore

    messages = contacts_gone = submissions = 0
    if (local.config.data_dir / "device.db").exists():
        device_db = local.device_db()
        submissions = SubmissionStore(device_db).remove_user(name)
        contacts_gone = ContactStore(device_db, name).forget_all()
        messages = FilingStore(device_db, local.config.data_dir / "filing").remove_user(name)
        AccountStore(device_db).remove(name)
    local.keys.remove_user(name)
    return messages, contacts_gone, submissions


# --- sending ------------------------------------------------------------------------------------


def submit(local: Local, user: str | None, recipients: list[Address], message: bytes) -> int:
    """Queue a message as if a mail client had submitted it (durable on return)."""
    from onionpost.device.submission import queue_submission, refuse_if_short
    from onionpost.store.disk import DiskRoom
    from onionpost.store.filing import FilingStore

    account = local.account(user)
    if not recipients:
        raise UsageError("Give at least one recipient (--to).")
    refuse_if_short(
        DiskRoom(local.config.data_dir, reserve_mib=local.config.min_free_mib), message, recipients
    )
    db = local.device_db()
    sid = queue_submission(
        db,
        filing=FilingStore(db, local.config.data_dir / "filing"),
        user=account.local,
        recipients=recipients,
        message=message,
        now=int(time.time()),
        lifetime=local.config.delivery.lifetime_seconds,
        own_address=account.address,
    )
    poke(local.config.data_dir)
    return sid
