"""From "the mail client pressed Send" to "the inbox's outbox has it", durably, with feedback.

:meth:`Submissions.submit` is what the SMTP gateway calls: it stores the message for every
recipient and files the sender's Sent copy in one transaction, and only then may the gateway
answer 250.  A worker then seals the message for each recipient (which needs their current
keys, fetched fresh; a cached copy when their inbox is unreachable) and hands each sealed copy
to the inbox's outbox.  Recipients whose keys cannot be had are retried with backoff until the
message's lifetime ends.

The user learns what happened the way mail users always have: a delay notice after
``delay_notice_seconds`` and a bounce (RFC 3464) in INBOX when a recipient is refused or the
lifetime runs out, whether the problem was here (no keys) or at the outbox (undeliverable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from typing import Any

from onionpost.base.aio import foreground
from onionpost.base.clock import Clock
from onionpost.base.config import DeliveryConfig
from onionpost.base.groupcommit import GroupCommit
from onionpost.core import dsn
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import hash32
from onionpost.core.errors import (
    AddressError,
    DiskFull,
    GatewayError,
    MessageTooLarge,
    OnionpostError,
    PermanentDeliveryError,
    TemporaryDeliveryError,
    TorStillConnecting,
    UnknownLocalUser,
)
from onionpost.core.queuestate import OutboxState, outbox_from_wire, recipient_outcome
from onionpost.core.retry import RetryPolicy, after_failure
from onionpost.device.filing import Filer, filing_key
from onionpost.device.sending import Outgoing
from onionpost.device.session import Device
from onionpost.inbox.postoffice import TOKEN_REFUSED
from onionpost.store.db import Database
from onionpost.store.disk import DiskRoom
from onionpost.store.filing import FilingStore
from onionpost.store.submissions import PendingRecipient, SubmissionStore

log = logging.getLogger(__name__)

#: Submissions of a page sealed and handed over at a time while no SMTP client is being
#: served.  Their envelopes go to the inbox together, in one request
#: (:mod:`onionpost.device.handovers`) and one commit there, so a device away from its inbox
#: waits one round trip over tor for up to 16 of them.  While clients are being served they
#: go one at a time (see ``Submissions._in_turn``).
HAND_OVERS_AT_ONCE = 16
#: Of those, at most this many messages larger than LARGE_MESSAGE: each is read into memory
#: to be sealed (four 50 MiB messages is already 200 MiB on a Pi).
LARGE_AT_ONCE = 4
LARGE_MESSAGE = 256 << 10
NOTIFIED_DELAY = 1
NOTIFIED_FINAL = 2
#: An outcome check asks the inbox about a handed-over row only once its next attempt (as
#: the last check learnt it) is at most CHECK_AHEAD seconds away: the outbox changes a row
#: when it attempts it.  Every FULL_CHECK_EVERY seconds (and first after a start) it asks
#: about every row, for what changes a row between attempts from elsewhere (another of the
#: user's devices retried or cancelled it).
CHECK_AHEAD = 60
FULL_CHECK_EVERY = 900


def header_block(message: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = message.find(sep)
        if end >= 0:
            return message[:end]
    return message[:65536]


def message_ref(message: bytes) -> str:
    value = BytesHeaderParser().parsebytes(header_block(message) + b"\r\n\r\n").get("Message-ID")
    return " ".join(str(value).split())[:200] if value else ""


def queue_submission(
    db: Database,
    *,
    filing: FilingStore,
    user: str,
    recipients: Sequence[Address],
    message: bytes,
    now: int,
    lifetime: int,
    own_address: Address | None = None,
    sent_copy_wait: int = 0,
) -> int:
    """Store a submission and queue its Sent copy in one transaction; durable on return.

    The Sent copy of what a mail client submitted waits ``sent_copy_wait`` seconds and is
    filed only if the client has not saved its own copy (same Message-ID) in Sent by then:
    one copy whatever the client does (see :mod:`onionpost.device.filing`).  ``onionpost send``
    passes 0: there is no client to save one.

    Mail addressed to the sender (``own_address`` among ``recipients``: To, Cc or Bcc) is
    also queued for their INBOX here, in the same transaction.  Sealing it to the user's own
    inbox would wait for keys and bounce, and the inbox would refuse it anyway.  The address
    stays a recipient only so the sealing worker makes a copy for the user's other devices;
    with no other devices it is simply done.

    Both copies are kept in the database (``filing_bodies``), not in spool files: the
    transaction's one COMMIT makes everything durable, so a group commit of many
    submissions costs one fsync (:class:`Submissions`).
    """
    ref = message_ref(message)
    with db.transaction():
        sid = SubmissionStore(db).add(
            user=user,
            message=message,
            headers=header_block(message),
            recipients=[str(a) for a in recipients],
            message_ref=ref,
            now=now,
            expires_at=now + lifetime,
        )
        waits = bool(sent_copy_wait and ref)
        filing.add(
            key=filing_key(b"submission", user.encode(), str(sid).encode(), b"Sent"),
            user=user,
            folder="Sent",
            message=message,
            now=now,
            mark_seen=True,
            unless_message_id=ref if waits else None,
            not_before=now + sent_copy_wait if waits else None,
            in_database=True,
        )
        if own_address is not None and own_address in recipients:
            filing.add(
                key=filing_key(b"submission", user.encode(), str(sid).encode(), b"INBOX"),
                user=user,
                folder="INBOX",
                message=message,
                now=now,
                in_database=True,
            )
    return sid


def refuse_if_short(room: DiskRoom | None, message: bytes, recipients: Sequence[Address]) -> None:
    """Refuse a submission that would eat into the disk's reserve (``DiskFull``: 452 4.3.1
    for a mail client, the same words for the CLI), before anything of it is stored."""
    # Stored once as the submission and the Sent copy, then sealed once per recipient.
    incoming = len(message) * (2 + len(recipients))
    if room is None or (free := room.short_by(incoming, refusing="a submission")) is None:
        return
    raise DiskFull(
        f"This node's disk is nearly full ({free >> 20} MiB free, {room.reserve >> 20} MiB "
        "are kept free), so the message was not accepted. Free disk space on the node "
        "(onionpost doctor shows how much is free), then send it again."
    )


@dataclass(frozen=True)
class _Pending:
    """A checked submission on its way into a group commit."""

    user: str
    recipients: tuple[Address, ...]
    message: bytes
    own_address: Address
    now: int


@dataclass(frozen=True)
class _Slots:
    """A sealing pass's bounds: submissions in flight, and large ones among them."""

    any: asyncio.Semaphore
    large: asyncio.Semaphore


class Submissions:
    def __init__(
        self,
        *,
        db: Database,
        filer: Filer,
        devices: Mapping[str, Device],
        clock: Clock,
        config: DeliveryConfig,
        unit_random: Callable[[], float],
        max_message_bytes: int,
        on_queued: Callable[[], None] | None = None,
        sent_copy_wait: int = 0,
        commit_db: Database | None = None,
        room: DiskRoom | None = None,
    ) -> None:
        self.sent_copy_wait = sent_copy_wait
        #: Refuses submissions while the disk is nearly full (None: never asks).
        self.room = room
        # The group commit's own connection to the same database file, used only by its
        # thread: the event loop's connection (``db``) stays the loop's alone.  Without one,
        # submit_async commits each submission on the loop, one at a time.
        self._commit_db = commit_db
        self._group: GroupCommit[_Pending, int] | None = None
        if commit_db is not None:
            self._commit_filing = FilingStore(commit_db, filer.store.spool_dir)
            self._group = GroupCommit(self._commit_batch, name="submit-commit")
        self.store = SubmissionStore(db)
        self._on_queued = on_queued
        self._one_at_a_time = asyncio.Lock()  # the sealing job's, while SMTP clients are served
        #: When each user's last outcome check asked about every row (see FULL_CHECK_EVERY).
        self._full_checks: dict[str, int] = {}
        self.db = db
        self.filer = filer
        self.devices = devices
        self.clock = clock
        self.config = config
        self.policy = RetryPolicy(config.retry_min_seconds, config.retry_max_seconds)
        self.unit_random = unit_random
        self.max_message_bytes = max_message_bytes

    # -- the hand-off ---------------------------------------------------------------------

    def submit(self, user: str, recipients: Sequence[Address], message: bytes) -> int:
        """Queue ``message`` for ``recipients``; durable (and filed in Sent) on return."""
        pending = self._check(user, recipients, message)
        sid = queue_submission(
            self.db,
            filing=self.filer.store,
            sent_copy_wait=self.sent_copy_wait,
            user=user,
            recipients=recipients,
            message=message,
            now=pending.now,
            lifetime=self.config.lifetime_seconds,
            own_address=pending.own_address,
        )
        self._queued()
        return sid

    async def submit_async(self, user: str, recipients: Sequence[Address], message: bytes) -> int:
        """:meth:`submit` for the SMTP gateway: the same checks and the same durable result
        on return, but the work (header parsing, the spool file, the transaction and its
        fsyncs) runs in the group commit's thread, and submissions that arrive while a
        commit runs share the next one (:mod:`onionpost.base.groupcommit`)."""
        pending = self._check(user, recipients, message)
        if self._group is None:
            return self.submit(user, recipients, message)
        sid = await self._group.submit(pending)
        self._queued()
        return sid

    def _check(self, user: str, recipients: Sequence[Address], message: bytes) -> _Pending:
        device = self.devices.get(user)
        if device is None:
            raise UnknownLocalUser(f"There is no onionpost user '{user}' on this node.")
        if not recipients:
            raise GatewayError("A message needs at least one recipient.", code="5.5.1")
        if len(message) > self.max_message_bytes:
            raise MessageTooLarge(
                f"The message is {len(message)} bytes; the limit is {self.max_message_bytes}."
            )
        refuse_if_short(self.room, message, recipients)
        return _Pending(user, tuple(recipients), message, device.address, self.clock.now())

    def _queued(self) -> None:
        self.filer.wake()
        self.wake()

    def _commit_batch(self, batch: list[_Pending]) -> list[int | BaseException]:
        """One transaction for the whole batch, in the group commit's thread: each
        submission in a savepoint of its own (a refused one takes only itself back), then
        the one COMMIT, the batch's one fsync (the WAL's; the Sent copies are rows too)."""
        db, filing = self._commit_db, self._commit_filing
        assert db is not None
        outcomes: list[int | BaseException] = []
        with db.transaction():
            for p in batch:
                try:
                    with db.transaction():  # a savepoint
                        outcomes.append(
                            queue_submission(
                                db,
                                filing=filing,
                                sent_copy_wait=self.sent_copy_wait,
                                user=p.user,
                                recipients=p.recipients,
                                message=p.message,
                                now=p.now,
                                lifetime=self.config.lifetime_seconds,
                                own_address=p.own_address,
                            )
                        )
                except OnionpostError as exc:
                    outcomes.append(exc)
        return outcomes

    async def close(self) -> None:
        """Let a running group commit finish (its clients hear their answer)."""
        if self._group is not None:
            await self._group.close()

    def wake(self) -> None:
        """Seal now rather than at the next tick: the scheduler's "seal" job, through
        ``on_queued`` (the node's and the test harness's
        :func:`onionpost.app.node.sealing_jobs`)."""
        if self._on_queued is not None:
            self._on_queued()

    # -- sealing --------------------------------------------------------------------------

    async def process_due(self) -> int:
        """Seal and hand over every recipient due now; returns how many were handled."""
        handled = 0
        after = (0, "")
        while True:
            due = self.store.due(self.clock.now(), after=after)
            if not due:
                return handled
            # The hand-overs of a page are recorded in one transaction after it, not one
            # commit each.  Nothing waits on this commit: the inbox had the envelope durably
            # first, and a crash before it only seals the message again, which the inbox
            # answers with the row it already queued (the same submission key).
            queued: list[tuple[int, str, int]] = []
            slots = _Slots(asyncio.Semaphore(HAND_OVERS_AT_ONCE), asyncio.Semaphore(LARGE_AT_ONCE))
            try:
                outcomes = await asyncio.gather(
                    *(self._in_turn(slots, sid, recips, queued) for sid, recips in due.items()),
                    return_exceptions=True,
                )
            finally:
                if queued:
                    with self.db.transaction():
                        for sid, address, outbox_id in queued:
                            self.store.mark_queued(sid, address, outbox_id)
            # Notices (a bounce at sealing, a delay) once per page and user, not once per
            # submission: each look is two queries over the user's queue.
            for user in {recips[0].user for recips in due.values()}:
                if user in self.devices:
                    self._notify(self.devices[user], self.clock.now())
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            handled += sum(len(recips) for recips in due.values())
            after = max(after, *((sid, max(r.address for r in rs)) for sid, rs in due.items()))

    async def _in_turn(
        self,
        slots: _Slots,
        sid: int,
        recips: list[PendingRecipient],
        queued: list[tuple[int, str, int]],
    ) -> None:
        large = self.store.message_size(sid) > LARGE_MESSAGE
        # A large one waits for its own bound first, so that it holds none of the others'
        # slots while it waits.
        async with slots.large if large else contextlib.nullcontext(), slots.any:
            await foreground.yield_to()  # SMTP clients waiting on a 250 go first
            if not foreground.busy_lately():
                await self._process(sid, recips, queued)
                return
            # SMTP clients keep coming: one submission at a time, whose hand-over's round
            # trip leaves the loop to them.  Four at once took that time too, and the SMTP
            # bench's latency doubled (docs/performance.md, "Eighth pass").
            async with self._one_at_a_time:
                await foreground.yield_to()  # again: the wait for the turn was no yield
                await self._process(sid, recips, queued)

    async def _process(
        self, sid: int, recips: list[PendingRecipient], queued: list[tuple[int, str, int]]
    ) -> None:
        device = self.devices.get(recips[0].user)
        now = self.clock.now()
        if device is None:
            for r in recips:
                self.store.mark_bounced(
                    sid, r.address, error="The sender's account is gone.", code="5.1.0"
                )
            return
        message = self.store.message(sid)
        addresses: list[Address] = []
        for r in recips:
            try:
                addresses.append(Address.parse(r.address))
            except AddressError as exc:
                self._fail(sid, r, PermanentDeliveryError.from_error(exc), now)
        me = str(device.address)
        # The own devices' copy goes with the first attempt, or for as long as the user, as a
        # recipient, is still waiting for it.
        include_own = all(r.attempts == 0 for r in recips) or any(r.address == me for r in recips)
        report = await device.sender.send(
            Outgoing(
                message,
                addresses,
                recips[0].message_ref,
                include_own=include_own,
                submission_key=f"s{sid}",
                content_type=self.store.content_type(sid),
            ),
            now=now,
        )
        for r in recips:
            if r.address == me and r.address not in report.queued.keys() | report.failed.keys():
                # No other device needs a copy; INBOX here was filed at submission.
                self.store.mark_delivered(sid, r.address)
            elif r.address in report.queued:
                queued.append((sid, r.address, report.queued[r.address]))  # see process_due
            elif r.address in report.failed:
                self._fail(sid, r, report.failed[r.address], now)
            else:  # every recipient gets an outcome, or the sealing pass would spin on it
                self._fail(
                    sid, r, TemporaryDeliveryError("The message could not be sealed yet."), now
                )

    def _fail(self, sid: int, r: PendingRecipient, exc: OnionpostError, now: int) -> None:
        if isinstance(exc, TorStillConnecting) or isinstance(exc.__cause__, TorStillConnecting):
            # Not an attempt: nothing was learnt about the recipient.  The recipient stays
            # due, and the node wakes this queue the moment its tor is ready.
            self.store.note_waiting(sid, r.address, error=str(exc), code="4" + exc.code[1:])
            return
        decision = after_failure(
            self.policy,
            attempts=r.attempts + 1,
            temporary=exc.temporary,
            now=now,
            expires_at=r.expires_at,
            unit_random=self.unit_random(),
        )
        code = exc.code
        if decision.retry_at is None:
            self.store.mark_bounced(sid, r.address, error=str(exc), code="5" + code[1:])
        else:
            self.store.mark_deferred(
                sid,
                r.address,
                next_attempt_at=decision.retry_at,
                error=str(exc),
                code="4" + code[1:],
            )
            log.info("sealing for %s deferred: %s", r.address, exc)

    # -- outcomes and notices -------------------------------------------------------------

    async def check_outbox(self, device: Device) -> None:
        """Learn what the inbox's outbox did with our mail; notify the user of trouble.

        Only the rows that may have changed are asked about (their next attempt has come,
        CHECK_AHEAD), and all of them every FULL_CHECK_EVERY: a recipient away for days
        with thousands of messages waiting costs a check a page of rows, not the whole
        queue every minute (over tor, for a device away from its inbox, a request per 200).
        """
        user = device.account.local
        now = self.clock.now()
        last_full = self._full_checks.get(user)
        full = last_full is None or now - last_full >= FULL_CHECK_EVERY
        mine = self.store.handed_over(user, due_by=None if full else now + CHECK_AHEAD)
        wanted = sorted({r.outbox_id for r in mine if r.outbox_id is not None})
        by_id: dict[object, dict[str, Any]] = {}
        for start in range(0, len(wanted), 200):  # only the rows we wait on, in batches
            for fetched in await device.session.outbox(ids=wanted[start : start + 200]):
                by_id[fetched.get("id")] = fetched
        # The outcomes learnt in one check are recorded in one transaction (nothing is
        # awaited inside it): a check after a burst would otherwise cost a durable commit
        # per delivered message.  Nothing is acknowledged on it; a crash before it only
        # means the next check learns the same outcomes again.
        if mine:
            with self.db.transaction():
                for r in mine:
                    self._record_outcome(device, r, by_id.get(r.outbox_id))
        if full:  # every row was asked about (a check that failed above asks all again)
            self._full_checks[user] = now
        self._notify(device, self.clock.now())

    def _record_outcome(
        self, device: Device, r: PendingRecipient, item: dict[str, Any] | None
    ) -> None:
        """Record what the inbox's outbox says of one handed-over recipient."""
        if item is None:
            return
        error = item.get("last_error") if isinstance(item.get("last_error"), str) else None
        code = item.get("last_error_code") if isinstance(item.get("last_error_code"), str) else None
        state = outbox_from_wire(item.get("state"), code)
        if state is OutboxState.RESEAL:
            address = Address.parse(r.address)
            device.directory.forget(address)
            if self.store.reseal(r.submission_id, r.address, self.clock.now()):
                log.info("%s changed keys; sealing the message again", r.address)
                self.wake()
                return
            state = OutboxState.BOUNCED  # nothing left to seal again: it stays bounced
        if state is OutboxState.BOUNCED and code == "5.7.1" and error == TOKEN_REFUSED:
            # Their inbox withdrew the token they gave us (or never had it): write to
            # them as a stranger from now on.  This message stays bounced.
            contact = device.contacts.get(r.address)
            if contact is not None and contact.token_to_them is not None:
                device.contacts.forget_token_to_them(r.address, contact.token_to_them)
        outcome = None if state is None else recipient_outcome(state)
        if outcome is not None:
            self.store.set_outcome(r.submission_id, r.address, outcome, error, code)
        elif state is OutboxState.QUEUED:
            attempts = item.get("attempts")
            attempts = attempts if isinstance(attempts, int) else r.attempts
            nxt = item.get("next_attempt_at")
            nxt = nxt if isinstance(nxt, int) else r.next_attempt_at
            # Written only when the outbox says something new: a long queue (a recipient
            # offline for days) would otherwise rewrite every row of it at every check.
            was = (r.attempts, r.last_error, r.last_error_code, r.next_attempt_at)
            if (attempts, error, code, nxt) != was:
                self.store.set_progress(
                    submission_id=r.submission_id,
                    address=r.address,
                    attempts=attempts,
                    error=error,
                    code=code,
                    next_attempt_at=nxt,
                )

    def _notify(self, device: Device, now: int) -> None:
        """File delay notices and bounces for this user's submissions, once each."""
        user = device.account.local
        rows = self.store.awaiting_delay_notice(user, now - self.config.delay_notice_seconds)
        rows += self.store.unnotified_bounces(user)
        groups: dict[tuple[int, str], list[dsn.RecipientStatus]] = {}
        marks: list[tuple[int, str, int]] = []
        for r in rows:
            if r.state == "bounced" and r.notified < NOTIFIED_FINAL:
                status = dsn.RecipientStatus(
                    r.address,
                    "failed",
                    _code(r.last_error_code, "5"),
                    r.last_error or "The message could not be delivered.",
                )
                groups.setdefault((r.submission_id, "failed"), []).append(status)
                marks.append((r.submission_id, r.address, NOTIFIED_FINAL))
            elif (
                r.state in ("pending", "queued")
                and r.notified < NOTIFIED_DELAY
                and now - r.created_at >= self.config.delay_notice_seconds
            ):
                status = dsn.RecipientStatus(
                    r.address,
                    "delayed",
                    _code(r.last_error_code, "4"),
                    r.last_error or "The recipient's inbox has not accepted it yet.",
                    retry_until=r.expires_at,
                )
                groups.setdefault((r.submission_id, "delayed"), []).append(status)
                marks.append((r.submission_id, r.address, NOTIFIED_DELAY))
        for (sid, kind), statuses in groups.items():
            sub = next(r for r in rows if r.submission_id == sid)
            notice = dsn.build(
                user_address=str(device.address),
                reporting_onion=device.address.domain,
                original_headers=self.store.headers(sid),
                arrival=sub.created_at,
                now=now,
                recipients=statuses,
            )
            key = hash32(
                b"onionpost/v1/dsn",
                str(sid).encode(),
                kind.encode(),
                *(s.address.encode() for s in statuses),
            )[:16]
            with self.db.transaction():
                if self.filer.store.record_seen(user, key, now + 60 * 86_400):
                    self.filer.queue(
                        key=filing_key(b"dsn", user.encode(), key),
                        user=user,
                        folder="INBOX",
                        message=notice,
                    )
                for m_sid, addr, level in marks:
                    if m_sid == sid and addr in {s.address for s in statuses}:
                        self.store.mark_notified(m_sid, addr, level)
            log.info("filed a %s notice for submission %d", kind, sid)


def _code(code: str | None, klass: str) -> str:
    if code and len(code) >= 5 and code[1] == ".":
        return klass + code[1:]
    return f"{klass}.0.0"
