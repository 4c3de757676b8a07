"""Outbox processing: deliver queued envelopes, record the outcome, retry or bounce.

The outbox table is the truth.  :meth:`OutboxWorker.run_due` claims due rows (a lease, so a
crash mid-delivery only delays a row), delivers each to its destination inbox — over the
network, or straight into this inbox when the recipient is a local user — and records exactly
one outcome: delivered, deferred with the next attempt time from :mod:`onionpost.core.retry`, or
bounced.  Delivery is idempotent end to end (the receiving inbox dedups on the envelope's
digest), so a retry after a crash never files a message twice.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Callable

from onionpost.base.aio import foreground
from onionpost.base.clock import Clock
from onionpost.core.address import Address, public_key_from_onion
from onionpost.core.errors import (
    AddressError,
    OnionpostError,
    PermanentDeliveryError,
    StaleRecipientKeys,
    TorStillConnecting,
)
from onionpost.core.retry import RetryPolicy, after_failure, worth_retrying
from onionpost.core.wire import (
    ASK_BATCHES_AGAIN_AFTER,
    BATCH_ENVELOPES,
    BATCHED_ENVELOPE_MAX,
    delivery_frame_head,
)
from onionpost.inbox.postoffice import Inbox
from onionpost.net.client import InboxClient
from onionpost.net.pool import ConnectionPool, peer_isolation
from onionpost.net.transport import Dialer
from onionpost.store.outbox import OutboxRow, OutboxStore

#: Envelopes up to this size are staged in memory on their way out, larger ones on disk.
SPOOL = 1 << 20

log = logging.getLogger(__name__)

#: How long a row claimed while this node's tor was not up rests before it is claimed again.
WAIT_FOR_TOR = 5
BATCH = 64


class OutboxWorker:
    def __init__(
        self,
        *,
        outbox: OutboxStore,
        inbox: Inbox,
        dialer: Dialer,
        clock: Clock,
        policy: RetryPolicy,
        unit_random: Callable[[], float],
        concurrency: int = 8,
        onion_port: int = 80,
        timeout: float = 180.0,
        can_reach_others: Callable[[], bool] = lambda: True,
        pool: ConnectionPool | None = None,
    ) -> None:
        #: Kept-alive connections per destination (deliveries to one inbox reuse them).
        self.pool = pool
        self.outbox = outbox
        self.inbox = inbox
        self.dialer = dialer
        self.clock = clock
        self.policy = policy
        self.unit_random = unit_random
        self.onion_port = onion_port
        self.timeout = timeout
        self.can_reach_others = can_reach_others
        self._slots = asyncio.Semaphore(concurrency)
        self.on_finished: list[Callable[[OutboxRow], None]] = []
        self._own_onion = Address.for_key("x", inbox.onion_pk).onion
        #: Rows being attempted now: a concurrent pass leaves them alone.  Kept in memory,
        #: not as a lease in the database (a commit per pass): only this worker delivers,
        #: and a restart forgets every claim anyway (``release_leases``).
        self._claimed: set[int] = set()
        #: Peer inboxes that answered ``POST /v1/deliveries`` with 404 (older ones), and
        #: until when their rows go one request each: an hour, then they are asked again
        #: (an upgraded one takes batches from then on).
        self._one_at_a_time: dict[str, int] = {}

    async def run_due(self) -> int:
        """Deliver everything due now; returns the number of rows attempted."""
        total = 0
        delivered: list[int] = []
        while True:
            # While this node's tor is not up, rows for other inboxes are left alone rather
            # than tried and failed: their attempts and backoff stay as they are, and they
            # go as soon as the node wakes this worker on tor becoming ready.
            await foreground.yield_to()  # SMTP clients waiting on a 250 go first
            only = None if self.can_reach_others() else self._own_onion
            # Group commit: the rows of the last pass that reached their inbox are marked
            # delivered by the next hand-over's commit (one happens anyway while mail keeps
            # coming), or at the end of this run: not one commit each, nor one per pass.
            # Nothing waits on these marks (the peer's `accepted` came first; the sender's
            # outcome notice follows them): a crash before them only makes the rows go out
            # again, and the receiving inbox drops the repeat by its digest.  The next pass
            # is claimed in memory (`_claimed`), with no commit.
            self.outbox.mark_delivered_later(delivered, now=self.clock.now())
            if self.outbox.marks_waiting() >= BATCH:  # a drain with no hand-overs coming
                self.outbox.flush_marks()
            self._notify_marked()
            rows = self.outbox.due_rows(
                self.clock.now(), limit=BATCH, skip=self._claimed, only_onion=only
            )
            if not rows:
                self.outbox.flush_marks()
                self._notify_marked()
                return total
            total += len(rows)
            claimed = {row.id for row in rows}
            self._claimed |= claimed
            try:
                units, sizes = self._units(rows)
                outcomes = await asyncio.gather(
                    *(self._attempt_unit(unit, sizes) for unit in units),
                    return_exceptions=True,
                )
            finally:
                self._claimed -= claimed
            delivered = [i for r in outcomes if isinstance(r, list) for i in r]
            failed = [r for r in outcomes if isinstance(r, BaseException)]
            if failed:
                self.outbox.mark_delivered_later(delivered, now=self.clock.now())
                self.outbox.flush_marks()
                self._notify_marked()
                raise failed[0]

    def _notify_marked(self) -> None:
        """Tell the listeners of the rows whose delivered mark has been committed."""
        for row_id in self.outbox.committed():
            self._notify(row_id)

    def _units(self, rows: list[OutboxRow]) -> tuple[list[list[OutboxRow]], dict[int, int]]:
        """The pass's rows in the groups that go out together, and the sizes of the
        envelopes that may share a request: up to :data:`BATCH_ENVELOPES` rows of at most
        :data:`BATCHED_ENVELOPE_MAX` for one peer inbox share a request; a larger envelope, a
        row for this node's own inbox or for an inbox that does not take several at once goes
        alone (as many at once as the delivery slots allow)."""
        now = self.clock.now()
        peers = [
            r
            for r in rows
            if r.onion != self._own_onion and self._one_at_a_time.get(r.onion, 0) <= now
        ]
        sizes = self.outbox.envelope_sizes([r.id for r in peers])
        units: list[list[OutboxRow]] = []
        by_onion: dict[str, list[OutboxRow]] = {}
        for row in rows:
            if 0 < sizes.get(row.id, 0) <= BATCHED_ENVELOPE_MAX:
                by_onion.setdefault(row.onion, []).append(row)
            else:
                units.append([row])
        for group in by_onion.values():
            units += [group[i : i + BATCH_ENVELOPES] for i in range(0, len(group), BATCH_ENVELOPES)]
        return units, sizes

    async def _attempt_unit(self, rows: list[OutboxRow], sizes: dict[int, int]) -> list[int]:
        """Try a group of rows (see :meth:`_units`); the ids of the delivered ones (the
        caller marks them); every other row's outcome is recorded here."""
        if len(rows) > 1:
            async with self._slots:
                live = [row for row in rows if not self._expired(row)]
                batch = await self._deliver_batch(live, sizes) if len(live) > 1 else None
            if batch is not None:
                return batch
            rows = live  # each on its own after all
        delivered: list[int] = []
        for row in rows:
            one = await self._attempt(row)
            if one is not None:
                delivered.append(one)
        return delivered

    async def _deliver_batch(
        self, rows: list[OutboxRow], sizes: dict[int, int]
    ) -> list[int] | None:
        """Deliver ``rows`` (all for one peer inbox) in one ``POST /v1/deliveries``; the ids
        delivered, each other row's failure recorded.  None when they should go one at a
        time instead: the peer does not take several at once, or refused the request as a
        whole for good (each row then gets its own answer)."""
        onion = rows[0].onion
        try:
            public_key_from_onion(onion)
        except AddressError:
            return None  # each bounces on its own, with its reason (see _deliver)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as body:
            for row in rows:
                body.write(delivery_frame_head(sizes[row.id]))
                self.outbox.copy_envelope(row.id, body)
            length = body.tell()
            body.seek(0)
            try:
                results = await self._client(onion).deliver_many((body, length), len(rows))
            except OnionpostError as exc:
                if not worth_retrying(exc):
                    log.info(
                        "%s refused several deliveries at once (%s); one at a time", onion, exc
                    )
                    return None
                for row in rows:
                    self._failed(row, exc)
                return []
        if results is None:
            log.info("%s takes one delivery at a time", onion)
            now = self.clock.now()
            self._one_at_a_time = {o: t for o, t in self._one_at_a_time.items() if t > now}
            self._one_at_a_time[onion] = now + ASK_BATCHES_AGAIN_AFTER
            return None
        delivered: list[int] = []
        for row, result in zip(rows, results, strict=True):
            if isinstance(result, OnionpostError):
                self._failed(row, result)
            else:
                log.info("delivered outbox row %d to %s (%s)", row.id, onion, result.receipt)
                delivered.append(row.id)
        return delivered

    def _expired(self, row: OutboxRow) -> bool:
        """Bounce the row if its lifetime ran out before this attempt."""
        now = self.clock.now()
        if now < row.expires_at:
            return False
        self._bounce(
            row,
            now,
            f"The message's lifetime ran out before it could be delivered; the last error "
            f"was: {row.last_error or 'none'}",
            row.last_error_code or "4.4.7",
            attempted=False,
        )
        return True

    async def _attempt(self, row: OutboxRow) -> int | None:
        """Try one row; its id if it was delivered (the caller marks it), else None (the
        failure is recorded here)."""
        async with self._slots:
            if self._expired(row):
                return None
            try:
                receipt = await self._deliver(row)
            except OnionpostError as exc:
                self._failed(row, exc)
                return None
            log.info("delivered outbox row %d to %s (%s)", row.id, row.onion, receipt)
            return row.id

    def _client(self, onion: str) -> InboxClient:
        return InboxClient(
            self.dialer,
            onion,
            port=self.onion_port,
            isolation=peer_isolation(onion),
            timeout=self.timeout,
            pool=self.pool,
        )

    async def _deliver(self, row: OutboxRow) -> str:
        try:
            public_key_from_onion(row.onion)  # a valid label, or the row bounces
        except AddressError as exc:
            raise PermanentDeliveryError.from_error(exc) from exc
        # The envelope goes from the database to a temporary file in pieces, and from there
        # to the peer (or our own inbox): a 64 MiB envelope is never held in memory.
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as envelope:
            length = self.outbox.copy_envelope(row.id, envelope)
            envelope.seek(0)
            if row.onion == self._own_onion:
                now = self.clock.now()
                unwrapped = await asyncio.to_thread(self.inbox.unwrap, envelope, length, now=now)
                # Into this node's own inbox: no peer waits for `accepted`, and the row's
                # delivered mark is a later, durable commit to the same file.  So this one
                # needs no fsync of its own: a power loss that undid it would undo the mark
                # too, the row would go again, and a device that filed it meanwhile answers
                # the repeat from its replay check (docs/queues.md, "Commits without an fsync").
                durable = self.inbox.store.db is not self.outbox.db
                with unwrapped:
                    return self.inbox.accept(unwrapped, now=now, durable=durable).receipt
            return (await self._client(row.onion).deliver((envelope, length))).receipt

    def _failed(self, row: OutboxRow, exc: OnionpostError) -> None:
        now = self.clock.now()
        if isinstance(exc, TorStillConnecting):
            # Claimed just before tor went down again (or before the node knew): not an
            # attempt.  The row rests briefly so this pass does not pick it up again.
            self.outbox.note_waiting(
                row.id, error=str(exc), code="4" + exc.code[1:], until=now + WAIT_FOR_TOR
            )
            return
        if isinstance(exc, StaleRecipientKeys):
            # Sending this envelope again cannot help: hand it back so the submitting device
            # seals the message again with the recipient's current keys.
            self.outbox.mark_reseal(row.id, now=now, error=str(exc))
            self._notify(row.id)
            return
        temporary = worth_retrying(exc)
        decision = after_failure(
            self.policy,
            attempts=row.attempts + 1,
            temporary=temporary,
            now=now,
            expires_at=row.expires_at,
            unit_random=self.unit_random(),
        )
        code = exc.code if exc.code[:1] in "45" else ("4" if temporary else "5") + ".0.0"
        if decision.retry_at is None:
            self._bounce(row, now, str(exc), code, attempted=True)
            return
        self.outbox.mark_deferred(
            row.id, now=now, next_attempt_at=decision.retry_at, error=str(exc), code=code
        )
        log.info(
            "delivery of outbox row %d to %s deferred until %d: %s",
            row.id,
            row.onion,
            decision.retry_at,
            exc,
        )

    def _bounce(self, row: OutboxRow, now: int, error: str, code: str, *, attempted: bool) -> None:
        self.outbox.mark_bounced(
            row.id, now=now, error=error, code="5" + code[1:], attempted=attempted
        )
        log.info("outbox row %d to %s bounced: %s", row.id, row.onion, error)
        self._notify(row.id)

    def _notify(self, row_id: int) -> None:
        row = self.outbox.get(row_id)
        if row is not None:
            for listener in self.on_finished:
                listener(row)
