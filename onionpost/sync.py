"""The device side of receiving: fetch sealed mail from our own inbox, open, verify, file.

For each message the inbox has spooled for this device: download the L2, open it (every
layer and the signature are checked inside :func:`~onionpost.crypto.envelope.open_inner`),
prove the signing key belongs to the sender (:func:`~onionpost.crypto.sender.verify_sender`,
offline, against our pin of the contact), normalise the content so no mail client can choke
on it, and queue it for filing — INBOX for others' mail, Sent for copies of our own mail from
our other devices (and INBOX too when we were among its recipients) — recording its message
id in the same transaction.  Only once the filer has it in the mailbox (Dovecot's LMTP
answered 250) is the inbox told to delete its copy.  A message that fails any check is
not filed; the user gets a notice in INBOX naming the failure instead.  A crash at any
point repeats work but never loses or duplicates mail.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from email.header import Header, decode_header, make_header
from email.utils import formataddr, formatdate, getaddresses, parseaddr
from typing import IO

from onionpost.account import Account
from onionpost.address import Address
from onionpost.api.client import DeviceSession, PendingMessage
from onionpost.crypto.envelope import (
    CONTENT_INTRODUCTION,
    CONTENT_RFC5322,
    EXT_ADDRESSED_TO_SELF,
    EXT_SENDER_PROFILE,
    EXT_TOKEN_GRANT,
    ContentHeader,
    open_inner,
)
from onionpost.crypto.fingerprint import fingerprint
from onionpost.crypto.introduction import MAX_BYTES as MAX_INTRODUCTION_BYTES
from onionpost.crypto.introduction import open_introduction
from onionpost.crypto.keys import DeviceList, Profile, shown_name
from onionpost.crypto.sender import (
    EXT_SENDER_KEYS,
    pin_encode,
    pin_parse,
    verify_sender,
)
from onionpost.errors import (
    CryptoError,
    FilingDeferred,
    IdentityKeyChanged,
    MalformedData,
    OnionpostError,
    ReplayedMessage,
)
from onionpost.filing import Filer, filing_key
from onionpost.introductions import is_contact, notice
from onionpost.normalize import (
    HEADER_BLOCK_LIMIT,
    WHOLE_MESSAGE_LIMIT,
    header_end,
    normalize,
    normalize_header,
    oversized_header,
)
from onionpost.store.contacts import ContactStore
from onionpost.store.filing import FilingStore
from onionpost.store.introductions import IntroductionStore

log = logging.getLogger(__name__)

SPOOL = 1 << 20
NOTICE_LIFETIME = 30 * 86_400
_OUR_HEADER = re.compile(rb"^x-onionpost-[a-z-]*[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class Filed:
    folder: str
    filings: tuple[int, ...] = ()


class _SeenIds:
    """The replay check ``open_inner`` asks; remembers the id it was last asked about."""

    def __init__(self, store: FilingStore, user: str) -> None:
        self._store, self._user = store, user
        self.last: bytes | None = None

    def seen(self, msg_id: bytes) -> bool:
        self.last = msg_id
        return self._store.is_seen(self._user, msg_id)


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
    ) -> None:
        self.account = account
        self.session = session
        self.filer = filer
        self.contacts = contacts
        self._now = now
        self.max_bytes = max_bytes
        self.user = account.local
        self._cursor = 0

    async def sync_once(self, *, wait: float = 0.0) -> int:
        """Process everything pending (waiting up to ``wait`` s for something to arrive).

        A message is acknowledged to the inbox (which then deletes it) only once it is in
        the mailbox: after LMTP's 250.  If the mailbox cannot take it now it stays in the
        inbox too, and :class:`FilingDeferred` makes the sync loop back off.

        Messages are taken in batches (:func:`_batches`): each batch is fetched, then opened
        and queued for filing in *one* transaction, filed with two commits, and acknowledged
        in one request, so a burst costs a few commits per batch instead of several per
        message.  The order of the durable steps is the single message's: queued, handed,
        filed (LMTP 250), removed, acknowledged.
        """
        pending = await self.session.pending(after=0, wait=wait)
        taken = 0
        unfiled = 0
        for batch in _batches(pending):
            done, left = await self._take(batch)
            if done:
                await self.session.acknowledge(done)
            taken += len(done)
            unfiled += left
        if unfiled:
            raise FilingDeferred(
                f"{unfiled} message(s) wait in the filing queue for the mailbox (Dovecot)."
            )
        return taken

    async def _take(self, batch: list[PendingMessage]) -> tuple[list[int], int]:
        """Fetch, open, queue and file one batch: the ids the inbox may now delete, and how
        many of the batch wait in the filing queue."""
        store = self.filer.store
        with contextlib.ExitStack() as files:
            fetched: list[tuple[PendingMessage, IO[bytes]]] = []
            for item in batch:
                l2 = files.enter_context(tempfile.SpooledTemporaryFile(max_size=SPOOL))
                try:
                    await self.session.fetch(item.id, l2, limit=self.max_bytes)
                except OnionpostError as exc:
                    # Network or storage trouble: leave it spooled and try again next time.
                    log.warning("could not take message %d from the inbox yet: %s", item.id, exc)
                    continue
                fetched.append((item, l2))
            opened: list[tuple[int, Filed]] = []
            # One transaction for the batch (nothing awaited inside it); each message in its
            # own savepoint, so one that fails leaves nothing behind and spoils no other.
            with store.db.transaction():
                for item, spooled in fetched:
                    try:
                        with store.db.transaction():
                            opened.append((item.id, self._open_fetched(spooled)))
                    except OnionpostError as exc:
                        log.warning(
                            "could not take message %d from the inbox yet: %s", item.id, exc
                        )
        left = await self.filer.settle_many([i for _, f in opened for i in f.filings])
        done = [item_id for item_id, f in opened if not left.intersection(f.filings)]
        return done, len(opened) - len(done)

    async def process(self, item: PendingMessage) -> Filed:
        """Fetch, open and queue one message (its own transaction); see :meth:`sync_once`."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as l2:
            await self.session.fetch(item.id, l2, limit=self.max_bytes)
            return self._open_fetched(l2)

    def _open_fetched(self, l2: IO[bytes]) -> Filed:
        size = l2.tell()
        l2.seek(0)
        digest = _file_digest(l2)
        l2.seek(0)
        return self._open_and_file(l2, size, digest)

    def _open_and_file(self, l2: IO[bytes], size: int, digest: bytes) -> Filed:
        now = self._now()
        store = self.filer.store
        seen = _SeenIds(store, self.user)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as body:
            header: ContentHeader | None = None
            try:
                opened = open_inner(
                    l2,
                    size,
                    prekeys=self.account.prekey_secrets(),
                    reader_uik=self.account.uik_pk,
                    now=now,
                    seen=seen,
                    sink=body,
                )
                header = opened.header
                if header.content_type == CONTENT_INTRODUCTION:
                    return self._introduction(header, body, now)
                if header.content_type != CONTENT_RFC5322:
                    return Filed("")  # key updates etc.: nothing to show
                folder, sender = self._authenticate(header, now)
            except ReplayedMessage:
                # Taken before (a crash or a failed filing came before the acknowledgement):
                # what is left to do is whatever of it still waits in the filing queue.
                left = store.pending_for(self.user, seen.last) if seen.last else []
                return Filed("", tuple(left))
            except CryptoError as exc:
                return self._notice(exc, header, digest, now)
            if folder == "INBOX" and self.contacts.is_blocked(str(sender.address)):
                # Blocked (`onionpost contacts block`): the sender is known only now, after
                # verification, so this is where mail that came as a stranger's is stopped.
                # Nothing is filed and no notice is made; the inbox is told it was taken.
                store.record_seen(self.user, header.msg_id, header.expires_at)
                log.info("dropped a message from a blocked sender")
                return Filed("")
            message, offset = _filed_form(body, sender, now)
            # Our own mail that was also addressed to us (another device of ours sent it): the
            # mark is signed by our own device, so it is trusted as much as the copy itself.
            to_self = folder == "Sent" and header.extension(EXT_ADDRESSED_TO_SELF) is not None
            folders = [folder, "INBOX"] if to_self else [folder]
            ids: list[int] = []
            with store.db.transaction():
                store.record_seen(self.user, header.msg_id, header.expires_at)
                for target in folders:
                    if offset is not None:  # a large message: its header, then the body file
                        body.seek(offset)
                    filing_id = self.filer.queue(
                        key=filing_key(
                            b"inbox", self.user.encode(), header.msg_id, target.encode()
                        ),
                        user=self.user,
                        folder=target,
                        message=message if offset is None else body,
                        prefix=b"" if offset is None else message,
                        source=header.msg_id,
                        mark_seen=target == "Sent",
                    )
                    if filing_id is not None:
                        ids.append(filing_id)
        log.info("queued a message for %s", " and ".join(folders))
        return Filed(folder, tuple(ids))

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
        pin = pin_parse(contact.pin) if contact else None
        known = DeviceList.parse(contact.device_list) if contact and contact.device_list else None
        try:
            verified = verify_sender(header, credentials, pin, known)
        except IdentityKeyChanged:
            if contact is not None:
                self.contacts.record_identity_change(key, contact.uik_pk, header.sender_uik, now)
            raise
        newer_list = known is None or verified.device_list.version > known.version
        self.contacts.remember(
            key,
            uik_pk=verified.uik_pk,
            pin=pin_encode(verified.pin),
            now=now,
            device_list=verified.device_list.encode() if newer_list else None,
        )
        grants = header.extension(EXT_TOKEN_GRANT) or b""
        for i in range(0, len(grants) - 63, 64):
            if grants[i : i + 32] == self.account.uik_pk:
                self.contacts.set_token_to_them(key, grants[i + 32 : i + 64])
        self._learn_profile(key, header, verified.uik_pk)
        contact = self.contacts.get(key)
        name = contact.display_name if contact is not None else ""
        return "INBOX", _Sender(address, verified.uik_pk, name)

    def _learn_profile(self, key: str, header: ContentHeader, uik_pk: bytes) -> None:
        """Remember the display name of the profile card the sender's device put in the
        signed header (extension 5), if it verifies for the sender's pinned identity and is
        not older than the one we know.  A card that does not verify is ignored (the
        message itself verified, so it is still delivered), with a warning in the log."""
        raw = header.extension(EXT_SENDER_PROFILE)
        if not raw:
            return
        try:
            card = Profile.parse(raw)
            card.verify_for(uik_pk)
        except CryptoError as exc:
            log.warning("ignored the profile in a message from %s: %s", key, exc)
            return
        self.contacts.set_profile(key, card.shown_name, card.issued_at)

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


#: A batch of pending messages is cut at this many messages or this many bytes (the fetched
#: envelopes are held in spooled temporary files until the batch is queued).
BATCH_MESSAGES = 32
BATCH_BYTES = 8 << 20


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
class _Sender:
    address: Address
    uik_pk: bytes
    #: The display name of the sender's newest verified profile ("" when none is known).
    verified_name: str = ""


def _file_digest(f: IO[bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    while piece := f.read(1 << 20):
        h.update(piece)
    return h.digest()


def _filed_form(body: IO[bytes], sender: _Sender, now: int) -> tuple[bytes, int | None]:
    """What to file for the opened message in ``body``: ``(message, None)``, the whole
    message stamped and normalised, for a message up to
    :data:`~onionpost.normalize.WHOLE_MESSAGE_LIMIT`; for a larger one ``(header, offset)``,
    its stamped and repaired header, to be followed by ``body`` from ``offset`` on, byte for
    byte, so that the message is never held in memory (see :mod:`onionpost.normalize`).
    """
    size = body.seek(0, 2)
    body.seek(0)
    if size <= WHOLE_MESSAGE_LIMIT:
        return normalize(_stamp(body.read(), sender), now=now), None
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
    found = [a.lower() for _, a in getaddresses(from_values) if a]
    extra: list[bytes] = [
        f"X-Onionpost-Verified: {verified} (identity {fingerprint(sender.uik_pk)})".encode()
    ]
    claimed = _display_name(from_values[0]) if from_values else ""
    display = claimed
    if sender.verified_name:
        display = _shown_display(claimed, sender.verified_name)
        extra.append(
            b"X-Onionpost-Verified-Name: "
            + Header(sender.verified_name, "utf-8").encode(maxlinelen=0).encode("ascii")
        )
    if found != [verified] or display != claimed:
        kept = [k for k in kept if k[:5].lower() != b"from:"]
        kept.append(b"From: " + formataddr((display, verified)).encode("utf-8"))
        extra.extend(
            b"X-Original-From:"
            + v.encode("utf-8", "replace").replace(b"\r", b" ").replace(b"\n", b" ")
            for v in from_values
        )
    return b"".join((eol.join(extra + kept), rest))


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
