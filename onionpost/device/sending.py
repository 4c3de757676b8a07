"""The device side of sending: seal a mail for every recipient device and queue it.

A submission becomes *sealing units*, each one signed L3 inside one L2:

* the visible copy, for the To/Cc recipients (and, when there is no Bcc, the sender's own
  other devices, which file it under Sent);
* one copy per Bcc recipient, whose signed recipient list names only that recipient, so Bcc
  recipients learn nothing about each other;
* when there are Bcc recipients, a separate copy for the sender's own other devices that
  keeps the Bcc header (the sender may see whom they blind-copied);
* when the sender is one of the recipients (mail to yourself, or a copy to yourself), also a
  separate copy for the sender's own other devices, marked :data:`EXT_ADDRESSED_TO_SELF` so
  they file it in INBOX as well as Sent.  It is separate so that the mark, which says the
  sender wrote to themself, is never seen by anyone else (it may be a Bcc).  This device's
  own INBOX copy is filed at submission (:func:`onionpost.device.submission.queue_submission`).

Each unit is wrapped once per destination inbox (L1, sealed to that inbox's server key,
carrying a contact token or a proof-of-work stamp) and handed to the device's own inbox,
whose outbox delivers and retries.  Nothing here holds more than one copy of a large
message in memory: layers stream through spooled temporary files.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import tempfile
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from typing import IO, TypeVar

from onionpost.base.aio import crypto_pool
from onionpost.base.hashing import hasher_in_background
from onionpost.core.account import Account
from onionpost.core.address import Address
from onionpost.core.crypto import envelope, pow
from onionpost.core.crypto.bundle import VerifiedBundle
from onionpost.core.crypto.envelope import (
    CONTENT_RFC5322,
    EXT_ADDRESSED_TO_SELF,
    EXT_SENDER_PROFILE,
    EXT_TOKEN_GRANT,
    StanzaTarget,
)
from onionpost.core.crypto.primitives import RandomSource, hash32, system_random
from onionpost.core.crypto.sender import EXT_SENDER_KEYS
from onionpost.core.errors import DeliveryError, OnionpostError, TemporaryDeliveryError
from onionpost.core.wire import HandOverFields
from onionpost.device.directory import Directory
from onionpost.device.handovers import HandOvers
from onionpost.net.client import DeviceSession
from onionpost.store.contacts import ContactStore
from onionpost.store.introductions import IntroductionStore

log = logging.getLogger(__name__)

T = TypeVar("T")
SPOOL = 1 << 20
#: Messages from this size on are sealed in the crypto pool (see :func:`seal_step`).
SEAL_IN_POOL_FROM = 256 << 10
_BCC = re.compile(rb"^bcc[ \t]*:", re.IGNORECASE)


@dataclass(frozen=True)
class Outgoing:
    """A mail as the client submitted it: the message and its envelope recipients."""

    message: bytes
    recipients: Sequence[Address]
    message_ref: str = ""
    #: Also seal a copy for the sender's other devices (their Sent folder); retries of a
    #: submission set this False, the first attempt already did it.
    include_own: bool = True
    #: Identifies this submission on this device; with it, sealing is repeatable: the same
    #: message id and the same outbox rows result however often it is retried.
    submission_key: str = ""
    #: The L3 content type: a mail, or an introduction (sealed for its recipients only).
    content_type: int = CONTENT_RFC5322


@dataclass
class SendReport:
    msg_ids: list[bytes] = field(default_factory=list)
    queued: dict[str, int] = field(default_factory=dict)  # destination -> outbox id
    failed: dict[str, OnionpostError] = field(default_factory=dict)


def _header_end(message: bytes) -> tuple[int, bytes]:
    """(offset of the blank line ending the header block, or -1; the line ending used)."""
    head_end = message.find(b"\r\n\r\n")
    sep = b"\r\n"
    if head_end < 0 or (0 <= message.find(b"\n\n", 0, head_end) < head_end):
        head_end, sep = message.find(b"\n\n"), b"\n"
    return head_end, sep


def visible_addresses(message: bytes) -> set[str]:
    """Addresses named in the To and Cc headers (lower-cased).

    Only the header block is parsed: the email parser given a whole message keeps several
    copies of the body (as text, as lines) however large it is.
    """
    head_end, sep = _header_end(message)
    head = message if head_end < 0 else message[: head_end + len(sep)]
    headers = BytesHeaderParser().parsebytes(head)
    found: set[str] = set()
    for name in ("to", "cc"):
        for _, addr in getaddresses([str(v) for v in headers.get_all(name, [])]):
            if addr:
                found.add(addr.strip().lower())
    return found


def strip_bcc(message: bytes) -> bytes:
    """The message without its Bcc header (and that header's continuation lines).

    Without a Bcc header this is ``message`` itself (no copy); with one, the new message is
    built in one allocation (the body is not sliced out first).
    """
    head_end, sep = _header_end(message)
    if head_end < 0:
        return message
    lines = message[:head_end].split(sep)
    kept: list[bytes] = []
    skipping = False
    for line in lines:
        if line[:1] in (b" ", b"\t") and skipping:
            continue
        skipping = bool(_BCC.match(line))
        if not skipping:
            kept.append(line)
    if len(kept) == len(lines):
        return message
    return b"".join((sep.join(kept), memoryview(message)[head_end:]))


@dataclass(frozen=True)
class _Unit:
    recipients: tuple[Address, ...]
    body: bytes
    include_own: bool
    to_self: bool = False
    content_type: int = CONTENT_RFC5322


async def seal_step(call: functools.partial[T], size: int, pool: Executor | None) -> T:
    """Run a sealing step: a large message's in the crypto pool (``pool``; None: the
    process's shared one), a small one's here.

    A seal is ~0.5 ms of fixed public-key work plus 5-10 ms per MiB.  A large message's
    would hold the event loop (half a second for 50 MiB, no SMTP client answered
    meanwhile), and most of its time is spent in libsodium, which lets the loop run
    beside it.  A small message's is mostly Python between short libsodium calls: in a
    thread it fights the loop for the GIL, and the loopback bench delivered a third fewer
    messages a second that way (docs/performance.md, "Seventh pass").  Each step's files
    are used by one thread at a time: the loop waits for the step before it touches
    them again.
    """
    if size < SEAL_IN_POOL_FROM:
        return call()
    pool = pool or crypto_pool()
    step = asyncio.get_running_loop().run_in_executor(pool, call)
    try:
        return await asyncio.shield(step)
    except asyncio.CancelledError:
        # The node stops: let the step finish (one seal at most) before the caller
        # closes the files it writes.
        await asyncio.wait({step})
        raise


class Sender:
    def __init__(
        self,
        *,
        account: Account,
        session: DeviceSession,
        directory: Directory,
        contacts: ContactStore,
        lifetime: int,
        rng: RandomSource = system_random,
        crypto_pool: Executor | None = None,
    ) -> None:
        """``crypto_pool`` seals (the node's crypto pool); None: the process's shared one
        (:func:`onionpost.base.aio.crypto_pool`)."""
        self.account = account
        self.session = session
        #: Envelopes sealed together go to the inbox in one request.
        self.hand_overs = HandOvers(session)
        self.directory = directory
        self.contacts = contacts
        self.lifetime = lifetime
        self.rng = rng
        self._crypto_pool = crypto_pool
        # Messages are sealed several at a time (the sealing job's page): two first messages
        # to the same new contact must not each register a token for it.
        self._granting = asyncio.Lock()

    def units(self, out: Outgoing) -> list[_Unit]:
        me = self.account.address
        if out.content_type != CONTENT_RFC5322:
            # Not a mail (an introduction): one unit per recipient, since each one's record
            # is its own, and no copy for the sender's other devices (nothing to file).
            return [
                _Unit((a,), out.message, False, content_type=out.content_type)
                for a in sorted(set(out.recipients))
                if a != me
            ]
        to_self = me in out.recipients
        shown = visible_addresses(out.message)
        recipients = sorted({a for a in out.recipients if a != me})
        visible = tuple(a for a in recipients if str(a) in shown)
        bcc = [a for a in recipients if str(a) not in shown]
        has_other_devices = out.include_own and bool(self.account.other_device_ids())
        # Others never see a Bcc header, not even one that names only the sender.
        clean = strip_bcc(out.message)
        own_apart = to_self or bool(bcc) or clean is not out.message
        units: list[_Unit] = []
        if visible or (has_other_devices and not own_apart):
            units.append(_Unit(visible, clean, has_other_devices and not own_apart))
        units.extend(_Unit((a,), clean, False) for a in bcc)
        if own_apart and has_other_devices:
            units.append(_Unit((), out.message, True, to_self))
        return units

    async def send(self, out: Outgoing, *, now: int) -> SendReport:
        """Seal and queue; per-destination failures are reported, not raised."""
        report = SendReport()
        own: VerifiedBundle | None = None
        for unit in self.units(out):
            bundles: dict[Address, VerifiedBundle] = {}
            for address in unit.recipients:
                try:
                    bundles[address] = (await self.directory.resolve(address, now=now)).bundle
                except (DeliveryError, OnionpostError) as exc:
                    report.failed[str(address)] = exc
            if unit.include_own and own is None:
                try:
                    own = (await self.directory.resolve(self.account.address, now=now)).bundle
                except OnionpostError as exc:
                    log.warning("cannot reach own inbox for the Sent copy: %s", exc)
                    if unit.to_self:  # the user is a recipient: retried like any other
                        report.failed[str(self.account.address)] = exc
            own_unit = own if unit.include_own else None
            if not bundles and own_unit is None:
                continue
            await self._seal_unit(
                key=out.submission_key,
                unit=unit,
                bundles=bundles,
                own=own_unit,
                ref=out.message_ref,
                now=now,
                report=report,
            )
        return report

    async def _seal_unit(
        self,
        *,
        key: str,
        unit: _Unit,
        bundles: dict[Address, VerifiedBundle],
        own: VerifiedBundle | None,
        ref: str,
        now: int,
        report: SendReport,
    ) -> None:
        me = self.account.address
        targets = [StanzaTarget(d.spk_id, d.spk_pk) for b in bundles.values() for d in b.devices]
        uiks = [b.uik_pk for b in bundles.values()]
        if own is not None:
            mine = self.account.device.device_id
            own_targets = [
                StanzaTarget(d.spk_id, d.spk_pk) for d in own.devices if d.device_id != mine
            ]
            if own_targets:
                targets += own_targets
                uiks.append(self.account.uik_pk)
            else:
                own = None
        if not targets:
            return
        grants = await self._token_grants(list(bundles), bundles, now)
        extensions = [(EXT_SENDER_KEYS, self.account.credentials())]
        if grants:
            extensions.append((EXT_TOKEN_GRANT, grants))
        if unit.to_self and own is not None:
            extensions.append((EXT_ADDRESSED_TO_SELF, b""))
        if self.account.profile_card is not None:
            extensions.append((EXT_SENDER_PROFILE, self.account.profile_card.encode()))
        expires_at = now + self.lifetime
        unit_key = ",".join([*(str(a) for a in unit.recipients), *(["self"] if own else [])])
        msg_id = None
        if key:
            msg_id = hash32(
                b"onionpost/v1/msg-id",
                self.account.device.device_id,
                key.encode(),
                unit_key.encode(),
            )[:16]
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as l2:
            inner = await seal_step(
                functools.partial(
                    envelope.seal_inner,
                    msg_id=msg_id,
                    sender=self.account.sender_keys(),
                    targets=targets,
                    recipient_uiks=uiks,
                    body=unit.body,
                    created_at=now,
                    expires_at=expires_at,
                    sink=l2,
                    content_type=unit.content_type,
                    extensions=extensions,
                    rng=self.rng,
                    hashers=hasher_in_background,
                    with_digest=False,  # only a stamp needs it: _digest, below
                ),
                len(unit.body),
                self._crypto_pool,
            )
            report.msg_ids.append(inner.msg_id)
            destinations: list[tuple[Address, VerifiedBundle]] = list(bundles.items())
            if own is not None:
                destinations.append((me, own))
            for address, bundle in destinations:
                try:
                    report.queued[str(address)] = await self._wrap_and_submit(
                        l2=l2,
                        inner=inner,
                        address=address,
                        bundle=bundle,
                        ref=ref,
                        now=now,
                        key=f"{key or inner.msg_id.hex()}:{address}",
                    )
                except OnionpostError as exc:
                    report.failed[str(address)] = exc

    async def _digest(self, l2: IO[bytes], inner: envelope.SealedInner) -> bytes:
        """The L2's digest, which a stamp binds: sealing leaves it out (most mail goes with a
        token, and a large message's hash pass cost as much as a cipher pass), so it is taken
        here for the rare stamped destination, beside a proof of work that costs far more."""
        if inner.digest is not None:
            return inner.digest
        l2.seek(0)
        return await seal_step(
            functools.partial(envelope.l2_digest, l2, inner.length, hasher_in_background),
            inner.length,
            self._crypto_pool,
        )

    async def _wrap_and_submit(
        self,
        *,
        l2: IO[bytes],
        inner: envelope.SealedInner,
        address: Address,
        bundle: VerifiedBundle,
        ref: str,
        now: int,
        key: str,
    ) -> int:
        token: bytes | None = None
        stamp: pow.Stamp | None = None
        if address == self.account.address:
            token = self.account.self_token
        else:
            contact = self.contacts.get(str(address))
            token = contact.token_to_them if contact else None
            if token is None and not bundle.policy.accepts_strangers:
                # No token of their own yet, and a stranger would be refused: an
                # introduction to them may have given us one (valid once they accepted it).
                token = IntroductionStore(self.contacts.db, self.contacts.user).present_token(
                    str(address), bundle.uik_pk, now
                )
            if token is None and bundle.policy.pow_bits > 0:
                if not bundle.policy.accepts_strangers:
                    raise TemporaryDeliveryError(
                        f"{address} accepts mail from contacts only; ask someone they know to "
                        "introduce you.",
                        code="5.7.1",
                    )
                stamp = await _mint(
                    bundle.mailbox_id, await self._digest(l2, inner), bundle.policy.pow_bits, now
                )
        l2.seek(0)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as l1:
            length = await seal_step(
                functools.partial(
                    envelope.seal_outer,
                    l2,
                    inner.length,
                    sek_id=bundle.sek_id,
                    sek_pk=bundle.sek_pk,
                    mailbox_id=bundle.mailbox_id,
                    not_after=inner.expires_at,
                    sink=l1,
                    token=token,
                    stamp=stamp,
                    rng=self.rng,
                ),
                inner.length,
                self._crypto_pool,
            )
            l1.seek(0)
            return await self.hand_overs.submit(
                HandOverFields(
                    destination=str(address),
                    msg_id=inner.msg_id,
                    expires_at=inner.expires_at,
                    ref=ref,
                    key=key,
                ),
                (l1, length),
            )

    async def _token_grants(
        self, addresses: list[Address], bundles: dict[Address, VerifiedBundle], now: int
    ) -> bytes:
        """Hand each recipient a token so they can reply without proof of work."""
        grants = b""
        async with self._granting:
            for address in addresses:
                contact = self.contacts.get(str(address))
                if contact is None or contact.blocked:
                    # a blocked contact gets no token (and the withdrawn one is never re-granted)
                    continue
                token = contact.token_from_them
                if token is None:
                    token = self.rng(32)
                    await self.session.register_token(token, str(address))
                    self.contacts.set_token_from_them(str(address), token)
                grants += bundles[address].uik_pk + token
        return grants


#: Nonces per worker-thread slice of a proof-of-work search: ~0.1 s on a laptop, so a node that
#: is told to stop waits at most that long for the thread it leaves behind.
_POW_SLICE = 1 << 16


async def _mint(mailbox_id: bytes, digest: bytes, bits: int, now: int) -> pow.Stamp:
    """:func:`pow.mint` in slices in a worker thread, cancellable between slices."""
    start = 0
    while True:
        stamp = await asyncio.to_thread(
            pow.mint_some, mailbox_id, digest, bits, now, start=start, count=_POW_SLICE
        )
        if stamp is not None:
            return stamp
        start += _POW_SLICE
