"""The device side of receiving: fetch sealed mail from our own inbox, open, verify, file.

For each message the inbox has spooled for this device: download the L2, open it (every
layer and the signature are checked inside :func:`~onionpost.core.crypto.envelope.open_inner`),
prove the signing key belongs to the sender (:func:`~onionpost.core.crypto.sender.verify_sender`,
offline, against our pin of the contact), normalise the content so no mail client can choke
on it, and queue it for filing — INBOX for others' mail, Sent for copies of our own mail from
our other devices (and INBOX too when we were among its recipients) — recording its message
id in the same transaction.  Only once the filer has it in the mailbox (Dovecot's LMTP
answered 250) is the inbox told to delete its copy.  A message that fails any check is
not filed; the user gets a notice in INBOX naming the failure instead.  A crash at any
point repeats work but never loses or duplicates mail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import hashlib
import logging
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from email.header import Header, decode_header, make_header
from email.utils import formataddr, formatdate, getaddresses, parseaddr
from typing import IO

from onionpost.base.aio import crypto_pool
from onionpost.base.hashing import Digest, digest_in_background, hasher_in_background
from onionpost.core.account import Account
from onionpost.core.address import Address
from onionpost.core.crypto.envelope import (
    CONTENT_INTRODUCTION,
    CONTENT_RFC5322,
    EXT_ADDRESSED_TO_SELF,
    EXT_SENDER_PROFILE,
    EXT_TOKEN_GRANT,
    ContentHeader,
    open_inner,
)
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.crypto.introduction import MAX_BYTES as MAX_INTRODUCTION_BYTES
from onionpost.core.crypto.introduction import open_introduction
from onionpost.core.crypto.keys import DeviceList, Profile, shown_name
from onionpost.core.crypto.sender import EXT_SENDER_KEYS, pin_encode, pin_parse, verify_sender
from onionpost.core.errors import (
    CryptoError,
    FilingDeferred,
    IdentityKeyChanged,
    MalformedData,
    OnionpostError,
)
from onionpost.core.normalize import (
    HEADER_BLOCK_LIMIT,
    WHOLE_MESSAGE_LIMIT,
    header_end,
    normalize,
    normalize_header,
    oversized_header,
)
from onionpost.core.trust import KEY_CHANGE_HEADER, QUARANTINE
from onionpost.device.filing import Filer, filing_key
from onionpost.device.introductions import is_contact, notice
from onionpost.net.client import DeviceSession, PendingMessage
from onionpost.store.contacts import Contact, ContactStore
from onionpost.store.introductions import IntroductionStore

log = logging.getLogger(__name__)

SPOOL = 1 << 20
NOTICE_LIFETIME = 30 * 86_400
_OUR_HEADER = re.compile(rb"^x-onionpost-[a-z-]*[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class Filed:
    folder: str
    filings: tuple[int, ...] = ()


@dataclass
class _Decrypted:
    """A fetched envelope opened by :func:`_decrypt`: its plaintext body (a temporary file the
    caller closes) and content header, or the error that stopped it."""

    body: IO[bytes]
    digest: bytes
    header: ContentHeader | None
    error: CryptoError | None
    #: The body's digest, for a message too large to normalise whole (it names a missing
    #: Message-ID), taken while the body was written; None for a smaller one.
    body_digest: bytes | None = None


class _NotSeenHere:
    """``open_inner``'s replay check, answered "no": it runs in a worker thread, where the
    database is not used; the caller checks the message id on the loop before filing."""

    def seen(self, msg_id: bytes) -> bool:
        return False


def _decrypt(
    l2: IO[bytes], prekeys: list[tuple[int, bytes, bytes]], reader_uik: bytes, now: int
) -> _Decrypted:
    """Open an L2 fetched into ``l2`` (positioned at its end): pure crypto and parsing, no
    database, safe in the crypto pool.  The replay check, the last one ``open_inner`` makes,
    is left to the caller.

    The L2's digest (and a large body's) is taken from the opening's own reads and writes,
    in the background for a large message: no pass over a file of its own, and none on the
    event loop later (a 50 MiB body took ~60 ms there)."""
    size = l2.tell()
    l2.seek(0)
    digest = digest_in_background(_digest16, size)
    reader = _Digesting(l2, digest)
    body = tempfile.SpooledTemporaryFile(max_size=SPOOL)  # noqa: SIM115 (the caller closes it)
    body_digest = digest_in_background(_digest16, size) if size > WHOLE_MESSAGE_LIMIT else None
    try:
        opened = open_inner(
            reader,
            size,
            prekeys=prekeys,
            reader_uik=reader_uik,
            now=now,
            seen=_NotSeenHere(),
            sink=body if body_digest is None else _Digesting(body, body_digest),
            hashers=hasher_in_background,
        )
    except CryptoError as exc:
        while reader.read(1 << 20):  # the notice names the whole L2, read or not
            pass
        return _Decrypted(body, digest.digest(), None, exc)
    except BaseException:
        body.close()
        raise
    return _Decrypted(
        body,
        digest.digest(),
        opened.header,
        None,
        None if body_digest is None else body_digest.digest(),
    )


def _digest16() -> hashlib.blake2b:
    """The digest that names an opened message's notice, or a large body's Message-ID."""
    return hashlib.blake2b(digest_size=16)


class _Digesting:
    """A file whose reads or writes also feed a digest."""

    def __init__(self, f: IO[bytes], digest: Digest) -> None:
        self._f = f
        self._digest = digest

    def read(self, n: int, /) -> bytes:
        data = self._f.read(n)
        self._digest.update(data)
        return data

    def write(self, data: bytes, /) -> int:
        self._digest.update(data)
        return self._f.write(data)


class Receiver:
    def __init__(
        self,
        *,
        account: Account,
        session: DeviceSession,
        filer: Filer,
        contacts: ContactStore,
        now: Callable[[], int],
        max_bytes: int,
        crypto_pool: Executor | None = None,
    ) -> None:
        """``crypto_pool`` opens the fetched envelopes (the node's crypto pool); None: the
        process's shared one (:func:`onionpost.base.aio.crypto_pool`)."""
        self.account = account
        self.session = session
        self.filer = filer
        self.contacts = contacts
        self._now = now
        self.max_bytes = max_bytes
        self._crypto_pool = crypto_pool
        self.user = account.local
        self._cursor = 0
        #: Spool ids filed but not yet acknowledged: they ride the next pending list's request.
        self._unacknowledged: list[int] = []

    async def sync_once(self, *, wait: float = 0.0, ack_with_next: bool = False) -> int:
        """Process everything pending (waiting up to ``wait`` s for something to arrive).

        A message is acknowledged to the inbox (which then deletes it) only once it is in
        the mailbox: after LMTP's 250.  If the mailbox cannot take it now it stays in the
        inbox too, and :class:`FilingDeferred` makes the sync loop back off.

        Messages are taken in batches (:func:`_batches`): each batch is fetched, then opened
        and queued for filing (already marked handed) in *one* transaction, filed, and
        acknowledged in one request; the removal of its filing rows rides the next batch's
        transaction.  So a sync costs one commit, not several per message.  The order of the
        durable steps is the single message's: queued and handed (and recorded seen), filed
        (LMTP 250), then acknowledged and removed (a crash before the removal costs a lookup
        in the mailbox; one before the inbox has the acknowledgement, a second offer of the
        message, recognised as seen with nothing left to file, and acknowledged).

        While one batch is filed, the next :data:`OPEN_AHEAD` are fetched and opened (no
        database is touched for that) and the acknowledgements of the ones before are on
        their way: over a slow link (a device and its inbox over tor) a backlog pays the
        round trips of its fetches and acknowledgements beside the filing, not after it.

        With ``ack_with_next`` (the sync loop, which asks again at once) the last batch's
        acknowledgement is not sent on its own: it rides the next sync's pending list
        (``ack`` of ``pending-mail``), so new mail costs one request per message, not two;
        :meth:`flush_acks` sends it when no sync follows.  Lost with a crash, it only makes
        the inbox offer those messages again, which are recognised and acknowledged.
        """
        taken = 0
        unfiled = 0
        with contextlib.ExitStack() as files:
            pending, inline = await self._pending(wait, files)
            batches = _batches(pending)
            ahead: collections.deque[asyncio.Task[list[_Opened]]] = collections.deque()
            acking: collections.deque[asyncio.Task[int]] = collections.deque()
            try:
                for i in range(len(batches)):
                    # This batch and up to OPEN_AHEAD after it are fetched and opened.
                    for later in batches[i + len(ahead) : i + 1 + OPEN_AHEAD]:
                        ahead.append(asyncio.ensure_future(self._open(later, inline)))
                    opened = await ahead.popleft()
                    try:
                        done, left = await self._take(opened)
                    finally:
                        _close_opened(opened)
                    if done and ack_with_next and i + 1 == len(batches):
                        self._unacknowledged.extend(done)
                    elif done:  # on its way while the next batches are filed
                        if len(acking) > OPEN_AHEAD:
                            await acking.popleft()
                        acking.append(asyncio.ensure_future(self.session.acknowledge(done)))
                    taken += len(done)
                    unfiled += left
                while acking:
                    await acking.popleft()
            finally:
                for task in ahead:  # a batch failed: the ones opened ahead are not filed
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        _close_opened(await task)
                for ack in acking:  # a batch failed: the inbox offers those again
                    ack.cancel()
                    ack.add_done_callback(_retrieved)
        if unfiled:
            raise FilingDeferred(
                f"{unfiled} message(s) wait in the filing queue for the mailbox (Dovecot)."
            )
        return taken

    async def _pending(
        self, wait: float, files: contextlib.ExitStack
    ) -> tuple[list[PendingMessage], dict[int, IO[bytes]]]:
        """What the inbox holds for this device, and the envelopes of its first batch
        (:func:`_batches`) from the same answer, spooled in files ``files`` closes: new mail
        costs one exchange with the inbox before it is opened, not two (an older inbox
        answers the list alone, and the batch is fetched as before)."""
        inline: dict[int, IO[bytes]] = {}

        def sink(item_id: int) -> IO[bytes]:
            l2 = files.enter_context(tempfile.SpooledTemporaryFile(max_size=SPOOL))  # noqa: SIM115 (files closes it)
            inline[item_id] = l2
            return l2

        acks = list(self._unacknowledged)
        answer = await self.session.pending_mail(
            wait=wait,
            count=BATCH_MESSAGES,
            limit=min(BATCH_BYTES, self.max_bytes),
            sink=sink,
            ack=acks,
        )
        if answer is None:
            await self.flush_acks()
            return await self.session.pending(after=0, wait=wait), {}
        self._acknowledged(acks)
        pending, got = answer
        return pending, {i: inline[i] for i in got}

    async def flush_acks(self) -> None:
        """Acknowledge what :meth:`sync_once` left for the next list (no sync follows: the
        device stops, or its inbox lists without ``pending-mail``)."""
        acks = list(self._unacknowledged)
        if acks:
            await self.session.acknowledge(acks)
            self._acknowledged(acks)

    def _acknowledged(self, acks: list[int]) -> None:
        done = set(acks)
        self._unacknowledged = [i for i in self._unacknowledged if i not in done]

    async def _open(
        self, batch: list[PendingMessage], inline: dict[int, IO[bytes]]
    ) -> list[_Opened]:
        """Fetch one batch (unless ``inline`` holds it already) and open its envelopes in
        the crypto pool, off the event loop and on every core: each message with what
        :func:`_decrypt` made of it.  Touches no database, so it may run while the batch
        before is filed.  The caller closes the opened bodies (:func:`_close_opened`).

        Cancelled while the pool opens the batch (a batch before it failed, or the device
        stops), it leaves the pool to finish what it started, and the bodies it opened are
        closed then, with the fetched envelopes they were read from."""
        files = contextlib.ExitStack()
        try:
            fetched = await self._fetch(batch, files, inline)
        except BaseException:
            files.close()
            raise
        now = self._now()
        prekeys, uik = self.account.prekey_secrets(), self.account.uik_pk
        loop = asyncio.get_running_loop()
        pool = self._crypto_pool or crypto_pool()
        work = asyncio.gather(
            *(
                loop.run_in_executor(pool, _decrypt, spooled, prekeys, uik, now)
                for _, spooled in fetched
            ),
            return_exceptions=True,
        )
        try:
            decrypted = await asyncio.shield(work)
        except BaseException:
            work.add_done_callback(lambda _: _close_unclaimed(work, files))
            raise
        files.close()
        return [(item, result) for (item, _), result in zip(fetched, decrypted, strict=True)]

    async def _take(self, opened: list[_Opened]) -> tuple[list[int], int]:
        """Queue and file one opened batch (:meth:`_open`): the ids the inbox may now
        delete, and how many of the batch wait in the filing queue."""
        store = self.filer.store
        now = self._now()
        taken: list[tuple[int, Filed]] = []
        # The rows the last batches put in the mailbox are removed by this batch's
        # COMMIT, not one of their own (settle_many's remove_later, below).
        removing = store.filed_waiting()
        # One transaction for the batch (nothing awaited inside it); each message in its
        # own savepoint, so one that fails leaves nothing behind and spoils no other.
        with store.db.transaction():
            store.forget_filed(removing)
            for item, result in opened:
                if isinstance(result, BaseException) and not isinstance(result, OnionpostError):
                    raise result
                try:
                    if isinstance(result, OnionpostError):
                        raise result
                    with store.db.transaction():
                        taken.append((item.id, self._file_decrypted(result, now)))
                except OnionpostError as exc:
                    log.warning("could not take message %d from the inbox yet: %s", item.id, exc)
        store.forgotten(removing)
        left = await self.filer.settle_many(
            [i for _, f in taken for i in f.filings], remove_later=True
        )
        done = [item_id for item_id, f in taken if not left.intersection(f.filings)]
        return done, len(taken) - len(done)

    async def _fetch(
        self,
        batch: list[PendingMessage],
        files: contextlib.ExitStack,
        inline: dict[int, IO[bytes]],
    ) -> list[tuple[PendingMessage, IO[bytes]]]:
        """The batch's envelopes, each in a spooled file that ``files`` closes: the ones
        the pending list's answer carried (``inline``), the rest in one request when they
        are several small ones, else one request each (also the fallback when the inbox does
        not serve batches, or a batch answer is refused)."""
        carried = {item.id: inline[item.id] for item in batch if item.id in inline}
        if carried:
            rest = [item for item in batch if item.id not in carried]
            more = await self._fetch(rest, files, {}) if rest else []
            by_id = {item.id: l2 for item, l2 in more} | carried
            return [(item, by_id[item.id]) for item in batch if item.id in by_id]
        spooled: dict[int, IO[bytes]] = {}

        def sink(item_id: int) -> IO[bytes]:
            l2 = files.enter_context(tempfile.SpooledTemporaryFile(max_size=SPOOL))  # noqa: SIM115 (files closes it)
            spooled[item_id] = l2
            return l2

        if len(batch) > 1 and all(item.size <= self.max_bytes for item in batch):
            try:
                got = set(await self.session.fetch_many(batch, sink))
            except OnionpostError as exc:
                log.info("fetching a batch failed (%s); fetching one at a time", exc)
                for l2 in spooled.values():
                    l2.close()
                spooled.clear()
            else:
                return [(item, spooled[item.id]) for item in batch if item.id in got]
        fetched: list[tuple[PendingMessage, IO[bytes]]] = []
        for item in batch:
            l2 = sink(item.id)
            try:
                await self.session.fetch(item.id, l2, limit=self.max_bytes)
            except OnionpostError as exc:
                # Network or storage trouble: leave it spooled and try again next time.
                log.warning("could not take message %d from the inbox yet: %s", item.id, exc)
                continue
            fetched.append((item, l2))
        return fetched

    async def process(self, item: PendingMessage) -> Filed:
        """Fetch, open and queue one message (its own transaction); see :meth:`sync_once`."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as l2:
            await self.session.fetch(item.id, l2, limit=self.max_bytes)
            return self._open_fetched(l2)

    def _open_fetched(self, l2: IO[bytes]) -> Filed:
        now = self._now()
        result = _decrypt(l2, self.account.prekey_secrets(), self.account.uik_pk, now)
        with result.body, self.filer.store.db.transaction():
            return self._file_decrypted(result, now)

    def _file_decrypted(self, opened: _Decrypted, now: int) -> Filed:
        """File what :func:`_decrypt` opened (or file a notice for what failed): the replay
        check, the sender's verification against our pins, normalising, queueing.  Call it
        inside a transaction (or savepoint) of its own: what it records is one step."""
        store = self.filer.store
        body, digest = opened.body, opened.digest
        header: ContentHeader | None = None
        try:
            if opened.error is not None:
                raise opened.error
            assert opened.header is not None
            header = opened.header
            if store.is_seen(self.user, header.msg_id):
                # The last check of open_inner, made here where the database is: taken before
                # (a crash or a failed filing came before the acknowledgement), so what is
                # left to do is whatever of it still waits in the filing queue.
                left = store.pending_for(self.user, header.msg_id)
                return Filed("", tuple(left))
            if header.content_type == CONTENT_INTRODUCTION:
                return self._introduction(header, body, now)
            if header.content_type != CONTENT_RFC5322:
                return Filed("")  # key updates etc.: nothing to show
            folder, sender = self._authenticate(header, now)
        except CryptoError as exc:
            return self._notice(exc, header, digest, now)
        dropped_or_held = self._drop_or_hold(body, header, folder, sender, now)
        if dropped_or_held is not None:
            return dropped_or_held
        message, offset = _filed_form(body, sender, now, opened.body_digest)
        # Our own mail that was also addressed to us (another device of ours sent it): the
        # mark is signed by our own device, so it is trusted as much as the copy itself.
        to_self = folder == "Sent" and header.extension(EXT_ADDRESSED_TO_SELF) is not None
        folders = [folder, "INBOX"] if to_self else [folder]
        ids: list[int] = []
        # In the caller's transaction (see above): recorded seen and queued as one step.
        store.record_seen(self.user, header.msg_id, header.expires_at)
        for target in folders:
            if offset is not None:  # a large message: its header, then the body file
                body.seek(offset)
            filing_id = self.filer.queue(
                key=filing_key(b"inbox", self.user.encode(), header.msg_id, target.encode()),
                user=self.user,
                folder=target,
                message=message if offset is None else body,
                prefix=b"" if offset is None else message,
                source=header.msg_id,
                mark_seen=target == "Sent",
                # A small message rides in the batch's COMMIT: no spool file and
                # no fsyncs of its own (a file and its directory, per message).
                in_database=offset is None and len(message) <= IN_DATABASE_BYTES,
                # Filed right after the batch's COMMIT (settle_many): marked handed in
                # it, so the batch's filing costs one commit (the removal), not two.
                handed=True,
            )
            if filing_id is not None:
                ids.append(filing_id)
        log.info("queued a message for %s", " and ".join(folders))
        return Filed(folder, tuple(ids))

    def _drop_or_hold(
        self, body: IO[bytes], header: ContentHeader, folder: str, sender: _Sender, now: int
    ) -> Filed | None:
        """Mail from a blocked sender (dropped) or signed by a changed identity key (held in
        Quarantine); None for mail to file as usual."""
        if folder != "Sent" and sender.blocked:
            # Blocked (`onionpost contacts block`): the sender is known only now, after
            # verification, so this is where mail that came as a stranger's is stopped.
            # Nothing is filed and no notice is made; the inbox is told it was taken.
            self.filer.store.record_seen(self.user, header.msg_id, header.expires_at)
            log.info("dropped a message from a blocked sender")
            return Filed("")
        if folder == QUARANTINE:
            return self._hold(body, header, sender, now)
        return None

    def _authenticate(self, header: ContentHeader, now: int) -> tuple[str, _Sender]:
        credentials = header.extension(EXT_SENDER_KEYS)
        own = header.sender_uik == self.account.uik_pk
        address = Address.for_key(header.sender_local, header.sender_onion_pk)
        if own:
            own_list = self.account.device_list
            verify_sender(header, credentials, None, own_list)
            if own_list.device(header.sender_device_id) is None:
                raise CryptoError("Your own message was signed by a device no longer on your list.")
            return "Sent", _Sender(address, header.sender_uik)
        key = str(address)
        contact = self.contacts.get(key)
        pin = _pin_parse(contact.pin) if contact else None
        known = _list_parse(contact.device_list) if contact and contact.device_list else None
        try:
            verified = verify_sender(header, credentials, pin, known)
        except IdentityKeyChanged:
            if contact is None:
                raise
            return QUARANTINE, self._new_key(address, contact, header, credentials)
        newer_list = known is None or verified.device_list.version > known.version
        pin_bytes = pin_encode(verified.pin)
        # Written only when it changes something (the contact as read above, in this same
        # transaction): mail arriving in a burst would otherwise rewrite the same row.
        if (
            contact is None
            or newer_list
            or contact.uik_pk != verified.uik_pk
            or contact.pin != pin_bytes
            or contact.last_seen != now
        ):
            self.contacts.remember(
                key,
                uik_pk=verified.uik_pk,
                pin=pin_bytes,
                now=now,
                device_list=verified.device_list.encode() if newer_list else None,
            )
        grants = header.extension(EXT_TOKEN_GRANT) or b""
        token_now = contact.token_to_them if contact is not None else None
        for i in range(0, len(grants) - 63, 64):
            if grants[i : i + 32] == self.account.uik_pk and grants[i + 32 : i + 64] != token_now:
                token_now = grants[i + 32 : i + 64]
                self.contacts.set_token_to_them(key, token_now)
        name = self._learn_profile(key, header, verified.uik_pk)
        if name is None:  # the name as read above: remember() was given none to record
            name = contact.display_name if contact is not None else ""
        blocked = contact is not None and contact.blocked
        return "INBOX", _Sender(address, verified.uik_pk, name, blocked=blocked)

    def _learn_profile(self, key: str, header: ContentHeader, uik_pk: bytes) -> str | None:
        """Remember the display name of the profile card the sender's device put in the
        signed header (extension 5), if it verifies for the sender's pinned identity and is
        not older than the one we know.  A card that does not verify is ignored (the
        message itself verified, so it is still delivered), with a warning in the log.
        The name recorded, or None if none was."""
        raw = header.extension(EXT_SENDER_PROFILE)
        if not raw:
            return None
        try:
            card = Profile.parse(raw)
            card.verify_for(uik_pk)
        except CryptoError as exc:
            log.warning("ignored the profile in a message from %s: %s", key, exc)
            return None
        if self.contacts.set_profile(key, card.shown_name, card.issued_at):
            return card.shown_name
        return None

    def _introduction(self, header: ContentHeader, body: IO[bytes], now: int) -> Filed:
        """An introduction (protocol §16): recorded and announced by a notice mail only when
        its sender is one of our contacts and every signature checked.

        From anyone else it is dropped unseen: who is not a contact cannot vouch for anyone
        (and must not be able to fill the mailbox with notices).  The sender is looked up
        by the address the header claims *before* anything is verified, only to decide to
        drop; a contact's introduction is then verified like any message.
        """
        store = self.filer.store
        try:
            claimed = str(Address.for_key(header.sender_local, header.sender_onion_pk))
        except OnionpostError:
            claimed = ""
        if header.sender_uik == self.account.uik_pk or not is_contact(
            self.contacts.get(claimed) if claimed else None
        ):
            store.record_seen(self.user, header.msg_id, header.expires_at)
            log.info("ignored an introduction from someone who is not a contact")
            return Filed("")
        folder, sender = self._authenticate(header, now)  # CryptoError: a notice is filed
        if folder != "INBOX":
            # Only the contact's pinned, accepted identity vouches for anyone: an
            # introduction signed by a key not accepted yet (held mail) is dropped.
            store.record_seen(self.user, header.msg_id, header.expires_at)
            log.info("ignored an introduction signed by a key that is not the pinned one")
            return Filed("")
        size = body.seek(0, 2)
        if size > MAX_INTRODUCTION_BYTES:
            raise MalformedData("The introduction is too long.")
        body.seek(0)
        intro = open_introduction(
            body.read(),
            dsk_pk=header.sender_dsk_pk,
            sender_uik=sender.uik_pk,
            reader_uik=self.account.uik_pk,
            now=now,
        )
        try:
            introduced = Address.for_key(intro.local, intro.onion_pk)
        except OnionpostError as exc:
            raise MalformedData(f"The introduction names an invalid address: {exc}") from exc
        if introduced == self.account.address:
            raise MalformedData("The introduction introduces you to yourself.")
        known = self.contacts.get(str(introduced))
        mail = notice(
            me=self.account.address,
            introducer=sender.address,
            introduced=introduced,
            intro=intro,
            pinned=known.uik_pk if known else None,
            msg_id=header.msg_id,
            now=now,
        )
        with store.db.transaction():
            if not store.record_seen(self.user, header.msg_id, header.expires_at):
                return Filed("INBOX", tuple(store.pending_for(self.user, header.msg_id)))
            IntroductionStore(store.db, self.user).add(
                introducer=str(sender.address),
                address=str(introduced),
                uik_pk=intro.uik_pk,
                admit_token=intro.admit_token,
                present_token=intro.present_token,
                now=now,
                expires_at=intro.expires_at,
            )
            filing_id = self.filer.queue(
                key=filing_key(b"introduction", self.user.encode(), header.msg_id),
                user=self.user,
                folder="INBOX",
                message=mail,
                source=header.msg_id,
            )
        log.info("an introduction from a contact was queued for INBOX")
        return Filed("INBOX", () if filing_id is None else (filing_id,))

    def _new_key(
        self, address: Address, contact: Contact, header: ContentHeader, credentials: bytes | None
    ) -> _Sender:
        """The sender of a message signed by an identity key other than the pinned one,
        verified as thoroughly as a first message is, against the new key (and what earlier
        messages or a bundle proved of it): a message that fails is not held but refused
        with a notice, like any other."""
        key = str(address)
        pending = self.contacts.pending_change(key, header.sender_uik)
        new_pin = pin_parse(pending.new_pin) if pending and pending.new_pin else None
        known = (
            DeviceList.parse(pending.new_device_list)
            if pending and pending.new_device_list
            else None
        )
        verified = verify_sender(header, credentials, new_pin, known)
        newer_list = known is None or verified.device_list.version > known.version
        return _Sender(
            address,
            verified.uik_pk,
            blocked=contact.blocked,
            held=_Held(
                contact,
                pin_encode(verified.pin),
                verified.device_list.encode() if newer_list else None,
            ),
        )

    def _hold(self, body: IO[bytes], header: ContentHeader, sender: _Sender, now: int) -> Filed:
        """File a message signed by a not-yet-accepted identity key into Quarantine, with
        the key-change header, and (once per change) a notice in INBOX saying what to run.

        Held, not delivered: nothing from a new key reaches INBOX before the person accepts
        it, whether or not the old key was verified (a verified contact's notice is louder).
        Mail signed by a key the person rejected is refused: recorded as taken, not filed.
        """
        assert sender.held is not None
        held = sender.held
        old, store = held.contact, self.filer.store
        address = str(sender.address)
        with store.db.transaction():
            store.record_seen(self.user, header.msg_id, header.expires_at)
            change = self.contacts.record_identity_change(
                address,
                old.uik_pk,
                sender.uik_pk,
                now,
                new_pin=held.pin,
                device_list=held.device_list,
                held=True,
            )
            if not change.pending:
                log.info("refused a message signed by an identity key the person rejected")
                return Filed("")
            stamped = _Sender(
                sender.address, sender.uik_pk, warning=_key_change_words(old, sender.uik_pk)
            )
            message, offset = _filed_form(body, stamped, now)
            if offset is not None:
                body.seek(offset)
            ids: list[int] = []
            filing_id = self.filer.queue(
                key=filing_key(b"inbox", self.user.encode(), header.msg_id, QUARANTINE.encode()),
                user=self.user,
                folder=QUARANTINE,
                message=message if offset is None else body,
                prefix=b"" if offset is None else message,
                source=header.msg_id,
            )
            if filing_id is not None:
                ids.append(filing_id)
            if self.contacts.mark_noticed(change.id):
                notice_id = self.filer.queue(
                    key=filing_key(
                        b"key-change", self.user.encode(), address.encode(), sender.uik_pk
                    ),
                    user=self.user,
                    folder="INBOX",
                    message=self._key_change_notice(old, sender, now),
                    source=header.msg_id,
                )
                if notice_id is not None:
                    ids.append(notice_id)
        log.warning("held a message signed by a changed identity key in %s", QUARANTINE)
        return Filed(QUARANTINE, tuple(ids))

    def _key_change_notice(self, old: Contact, sender: _Sender, now: int) -> bytes:
        """The INBOX notice of a held key change: who, both fingerprints, what to run."""
        me = self.account.address
        address = str(sender.address)
        old_fp, new_fp = fingerprint(old.uik_pk), fingerprint(sender.uik_pk)
        if old.verified:
            subject = f"WARNING: your VERIFIED contact {address} changed identity key"
            louder = (
                "You had VERIFIED this contact's key (onionpost contacts verify). A verified "
                "key changes only if they reset onionpost or lost every device that held "
                "it. Treat this as a possible impersonation until they confirm it in person "
                "or by a phone call in their own voice.\r\n\r\n"
            )
        else:
            subject = f"Identity key changed: {address} (mail held in {QUARANTINE})"
            louder = ""
        text = (
            f"{address} sent you mail signed with a NEW identity key. It was held in your "
            f"{QUARANTINE} folder and not delivered to your INBOX.\r\n\r\n"
            f"  pinned key (the one you know):  {old_fp}\r\n"
            f"  new key (not accepted):         {new_fp}\r\n\r\n"
            + louder
            + "Either your contact reset their identity (a new installation, lost devices), "
            "or someone else now speaks for their address. Ask them, over a channel you "
            "trust, to read you their fingerprint (onionpost contacts me). Then run one of:\r\n"
            f"\r\n  onionpost contacts show {address}\r\n"
            "      both keys and safety numbers side by side\r\n"
            f"  onionpost contacts accept-key {address} FINGERPRINT\r\n"
            "      pins the new key, if FINGERPRINT (what they read you) is its own\r\n"
            f"  onionpost contacts reject-key {address}\r\n"
            "      keeps the old key; mail signed by the new one is refused\r\n\r\n"
            f"Until then further mail signed by the new key is held in {QUARANTINE} too. "
            f"Held mail stays in {QUARANTINE} after you accept the key: move it yourself "
            "once you are sure.\r\n"
        )
        return (
            f"From: onionpost <postmaster@{me.domain}>\r\n"
            f"To: {me}\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {formatdate(now, usegmt=True)}\r\n"
            f"Message-ID: <key-change.{sender.uik_pk.hex()[:32]}.{now}@{me.domain}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
            "X-Onionpost-Notice: key-change\r\n"
            f"{KEY_CHANGE_HEADER}: {_key_change_words(old, sender.uik_pk)}\r\n"
            "\r\n" + text
        ).encode("utf-8")

    def _notice(
        self, exc: OnionpostError, header: ContentHeader | None, digest: bytes, now: int
    ) -> Filed:
        """File a plain notice in INBOX instead of a message that failed verification."""
        me = self.account.address
        claimed = "unknown (the message could not be opened far enough to tell)"
        if header is not None:
            try:
                claimed = str(Address.for_key(header.sender_local, header.sender_onion_pk))
            except OnionpostError:
                claimed = "an invalid address"
        text = (
            "onionpost received a message for you that failed verification, so it was not "
            "delivered and nothing from it was shown.\r\n\r\n"
            f"Reason: {exc}\r\n"
            f"Claimed sender: {claimed}\r\n\r\n"
            "If you expected mail from this sender, ask them to send it again. If the reason "
            "mentions a changed identity key, compare safety numbers with them first "
            "(onionpost contacts show ADDRESS).\r\n"
        )
        notice = (
            f"From: onionpost <postmaster@{me.domain}>\r\n"
            f"To: {me}\r\n"
            "Subject: A message could not be verified\r\n"
            f"Date: {formatdate(now, usegmt=True)}\r\n"
            f"Message-ID: <notice.{digest.hex()}@{me.domain}>\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n"
            "X-Onionpost-Notice: verification-failed\r\n"
            "\r\n" + text
        ).encode("utf-8")
        log.warning("a message failed verification (%s); notice filed", exc)
        store = self.filer.store
        with store.db.transaction():
            if not store.record_seen(self.user, digest, now + NOTICE_LIFETIME):
                left = store.pending_for(self.user, digest)
                return Filed("INBOX", tuple(left))
            filing_id = self.filer.queue(
                key=filing_key(b"notice", self.user.encode(), digest),
                user=self.user,
                folder="INBOX",
                message=notice,
                source=digest,
            )
        return Filed("INBOX", () if filing_id is None else (filing_id,))


#: Messages up to this size wait for filing in the database rather than in a spool file.
IN_DATABASE_BYTES = 1 << 20

#: A batch of pending messages is cut at this many messages or this many bytes (the fetched
#: envelopes are held in spooled temporary files until the batch is queued).
BATCH_MESSAGES = 16
#: Batches fetched and opened while the one before them is filed, and acknowledgements on
#: their way at once.  Over a slow link to the inbox (a device on the far side of tor) a
#: backlog then moves about OPEN_AHEAD + 1 batches per round trip, not one, until filing is
#: the limit.  At most OPEN_AHEAD + 1 batches are held opened (each at most BATCH_BYTES; a
#: message past SPOOL is spooled to disk).
OPEN_AHEAD = 3
BATCH_BYTES = 8 << 20


#: A message of a batch and what opening it gave: its content, or why it failed.
_Opened = tuple[PendingMessage, "_Decrypted | BaseException"]


def _close_opened(opened: list[_Opened]) -> None:
    for _, result in opened:
        if isinstance(result, _Decrypted):
            result.body.close()


def _close_unclaimed(
    work: asyncio.Future[list[_Decrypted | BaseException]], files: contextlib.ExitStack
) -> None:
    """What the pool opened for a caller that left (:meth:`Receiver._open`), and its inputs."""
    if not work.cancelled():
        for result in work.result():
            if isinstance(result, _Decrypted):
                result.body.close()
    files.close()


def _retrieved(task: asyncio.Task[int]) -> None:
    """Done callback of a task nobody awaits: its failure is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()


def _batches(pending: list[PendingMessage]) -> list[list[PendingMessage]]:
    """``pending`` in order, cut into batches of at most :data:`BATCH_MESSAGES` messages and
    about :data:`BATCH_BYTES` (a larger message makes a batch of its own)."""
    out: list[list[PendingMessage]] = []
    size = 0
    for item in pending:
        if not out or len(out[-1]) >= BATCH_MESSAGES or size + item.size > BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(item)
        size += item.size
    return out


@dataclass(frozen=True)
class _Held:
    """What a message signed by a changed identity key proved of the new key."""

    contact: Contact
    pin: bytes
    device_list: bytes | None


@dataclass(frozen=True)
class _Sender:
    address: Address
    uik_pk: bytes
    #: The display name of the sender's newest verified profile ("" when none is known).
    verified_name: str = ""
    #: Set for a message signed by a not-yet-accepted identity key (held in Quarantine).
    held: _Held | None = None
    #: The key-change warning to stamp instead of X-Onionpost-Verified.
    warning: str | None = None
    #: The person blocked this sender (as the contact's row said when it was verified).
    blocked: bool = False


def _key_change_words(old: Contact, new_uik: bytes) -> str:
    """The value of the key-change header: held, both fingerprints, what to run."""
    verified = " which you had VERIFIED" if old.verified else ""
    return (
        f"HELD: signed by a NEW identity key {fingerprint(new_uik)}, not the pinned key "
        f"{fingerprint(old.uik_pk)}{verified}; not accepted yet. Compare with "
        f"onionpost contacts show {old.address}"
    )


def _file_digest(f: IO[bytes]) -> bytes:
    h = _digest16()
    while piece := f.read(1 << 20):
        h.update(piece)
    return h.digest()


def _filed_form(
    body: IO[bytes], sender: _Sender, now: int, digest: bytes | None = None
) -> tuple[bytes, int | None]:
    """What to file for the opened message in ``body``: ``(message, None)``, the whole
    message stamped and normalised, for a message up to
    :data:`~onionpost.core.normalize.WHOLE_MESSAGE_LIMIT`; for a larger one ``(header, offset)``,
    its stamped and repaired header, to be followed by ``body`` from ``offset`` on, byte for
    byte, so that the message is never held in memory (see :mod:`onionpost.core.normalize`).
    ``digest`` is the body's, when the opening took it already.
    """
    size = body.seek(0, 2)
    body.seek(0)
    if size <= WHOLE_MESSAGE_LIMIT:
        return normalize(_stamp(body.read(), sender), now=now), None
    if digest is None:
        digest = _file_digest(body)
        body.seek(0)
    first = body.read(HEADER_BLOCK_LIMIT)
    found = header_end(first)
    if found is None:
        # No blank line within the bound: a fresh header, the whole original as an attachment.
        log.warning("a large message's header block is over 1 MiB; filed as an attachment")
        return _stamp(oversized_header(now, digest), sender), 0
    stamped = _stamp(first[: found[1]], sender)
    del first
    end = header_end(stamped)
    head = stamped if end is None else stamped[: end[0]]
    return normalize_header(head, now=now, digest=digest), found[1]


def _stamp(message: bytes, sender: _Sender) -> bytes:
    """Add what onionpost verified, drop look-alike headers, and make From tell the truth.

    Runs on the message as the peer sent it (CRLF or bare LF), before normalisation, so the
    normaliser's own notes survive while a peer's forged ``X-Onionpost-*`` headers do not.
    The From header is the sender's own words; the verified sender address is ours.  If they
    differ, From is rewritten to the verified address (display name kept) and the original
    is kept as X-Original-From, so a contact cannot make mail look as if someone else wrote it.
    """
    crlf = message.find(b"\r\n\r\n")
    lf = message.find(b"\n\n")
    # The body is not sliced out (a copy of a 50 MiB message); the result is built in one
    # allocation from the new header block and a view of the body.
    view = memoryview(message)
    if crlf >= 0 and (lf < 0 or crlf <= lf):
        head, rest, eol = message[:crlf], view[crlf:], b"\r\n"
    elif lf >= 0:
        head, rest, eol = message[:lf], view[lf:], b"\n"
    else:
        head, rest, eol = message, view[len(message) :], b"\r\n"
    fields: list[list[bytes]] = []
    for line in head.split(eol):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    kept: list[bytes] = []
    from_values: list[str] = []
    for f in fields:
        if _OUR_HEADER.match(f[0]):
            continue
        if f[0][:5].lower() == b"from:":
            from_values.append(b" ".join(f)[5:].decode("utf-8", "replace"))
        kept.append(eol.join(f))
    verified = str(sender.address)
    found, claimed = _from_facts(tuple(from_values))
    extra: list[bytes] = [_verification_line(sender)]
    display = claimed
    if sender.verified_name:
        display = _shown_display(claimed, sender.verified_name)
        extra.append(
            b"X-Onionpost-Verified-Name: "
            + Header(sender.verified_name, "utf-8").encode(maxlinelen=0).encode("ascii")
        )
    if found != (verified,) or display != claimed:
        kept = [k for k in kept if k[:5].lower() != b"from:"]
        kept.append(b"From: " + formataddr((display, verified)).encode("utf-8"))
        extra.extend(
            b"X-Original-From:"
            + v.encode("utf-8", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
            for v in from_values
        )
    return b"".join((eol.join(extra + kept), rest))


def _from_facts(from_values: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    """The addresses the From fields name (lower case) and the first one's display name:
    the standard library's address parser, a large share of a received message's CPU, and
    a pure function of the fields, which recur in every message of a contact.  Remembered
    for short fields (:func:`_from_facts_memo`)."""
    if sum(len(v) for v in from_values) > _FROM_MEMO_CHARS:
        return _parse_from(from_values)
    return _from_facts_memo(from_values)


def _parse_from(from_values: tuple[str, ...]) -> tuple[tuple[str, ...], str]:
    found = tuple(a.lower() for _, a in getaddresses(list(from_values)) if a)
    return found, _display_name(from_values[0]) if from_values else ""


_FROM_MEMO_CHARS = 1024
_from_facts_memo = functools.lru_cache(maxsize=1024)(_parse_from)

# The contact's stored pin and device list, parsed per message and device before: pure parses
# of the stored bytes (verified before they were stored), remembered by those exact bytes.
# Nothing mutates a Pin or a DeviceList (verify_sender copies the pin's heads to advance it).
_pin_parse = functools.lru_cache(maxsize=256)(pin_parse)
_list_parse = functools.lru_cache(maxsize=256)(DeviceList.parse)
# The verified sender's fingerprint, stamped into every message: a pure function of the key.
_fingerprint = functools.lru_cache(maxsize=256)(fingerprint)


def _verification_line(sender: _Sender) -> bytes:
    """X-Onionpost-Verified for mail from the pinned key; for held mail (a changed key) the
    key-change warning instead, so that nothing calls it verified before it is accepted."""
    if sender.warning is not None:
        return f"{KEY_CHANGE_HEADER}: {sender.warning}".encode()
    return (
        f"X-Onionpost-Verified: {sender.address} (identity {_fingerprint(sender.uik_pk)})".encode()
    )


def _display_name(from_value: str) -> str:
    """The display name of a From header's value as a person would read it (encoded words
    decoded), "" when there is none or it cannot be read."""
    raw = parseaddr(from_value)[0]
    if "=?" not in raw:
        return raw
    try:
        return str(make_header(decode_header(raw)))
    except (ValueError, LookupError, UnicodeError):
        return raw


def _shown_display(claimed: str, verified_name: str) -> str:
    """The From display name to file when the sender's verified profile name is known.

    The verified name always comes first (a mail client's message list shows the start of
    it); a different name the message itself claims is kept after it, marked, so a contact
    whose profile says "Alice Liddell" cannot pass as "Your Bank" by writing that into
    From: ``Alice Liddell (unverified: Your Bank)``.  Case and spacing do not count.
    """
    said = shown_name(claimed)
    if not said or said.casefold() == verified_name.casefold():
        return verified_name
    return f"{verified_name} (unverified: {said})"
