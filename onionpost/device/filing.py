"""The filer: hands queued mail to the person's mailbox (Dovecot's LMTP), exactly once.

Mail reaches the filing queue (:mod:`onionpost.store.filing`) in the same transaction as
whatever else made it (a submission, a message id taken from the inbox).  The filer takes
each due row to a :class:`MailSink` (in production Dovecot: ``gateway.mailsink``) and
removes it after LMTP's 250.

Exactly once across crashes: a row is marked *handed* before LMTP sees a byte, and the
message carries the row's key in an ``X-Onionpost-Filing`` header.  A handed row whose
outcome is unknown (the node died between LMTP's 250 and the row's removal, or the
connection broke after the data was sent) is first looked up in the mailbox by that header;
only if it is not there is it filed again.

Sent copies of what a local mail client submitted wait ``sent_copy_wait`` seconds and are
filed only if the Sent folder does not hold a message with the same Message-ID by then: a
client that saves its own copy (Thunderbird's default, mutt's ``record``) does so right
after sending, and then there is exactly one copy, the client's, byte for byte.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from onionpost.base.aio import cancel_and_wait, foreground
from onionpost.base.clock import Clock, wait_event
from onionpost.core.errors import FilingRefused, OnionpostError
from onionpost.core.retry import FILING
from onionpost.store.filing import FILED, HANDED, QUEUED, Filing, FilingStore, MessageSource

log = logging.getLogger(__name__)

#: The header that names a filing in the mailbox (recovery after a crash looks for it).
FILING_HEADER = "X-Onionpost-Filing"
#: UIDNEXT readings kept per folder (at most one a second): an hour of steady filing.
FLOORS_KEPT = 4096
#: Seconds a filed row waits for the receiver's next batch to carry its removal before the
#: filer's loop removes it in a commit of its own (the device has gone quiet).
REMOVAL_WAIT = 2


def filing_key(kind: bytes, *parts: bytes) -> bytes:
    """A filing's key: the same mail filed twice gets the same key, so it is queued once."""
    h = hashlib.blake2b(digest_size=16, person=b"onionpost-file")
    h.update(kind)
    for part in parts:
        h.update(len(part).to_bytes(4, "big") + part)
    return h.digest()


class MailSink(Protocol):
    """The person's mailbox, as the filer needs it."""

    async def deliver(
        self,
        user: str,
        folder: str,
        message: Path | bytes,
        *,
        header: bytes,
        seen: bool = False,
    ) -> None:
        """File ``header`` + the message (a spool file, or the bytes of one kept in the
        database), flagged ``\\Seen`` if ``seen``; return only once durably stored
        (LMTP 250, an APPEND's OK).
        :class:`FilingDeferred` if it may work later, :class:`FilingRefused` if never."""

    async def holds(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> bool:
        """Whether ``folder`` holds a message whose ``header`` is ``value``, among those
        with a UID of ``from_uid`` or more (a header search costs a look at every message
        it covers: in a folder of 100,000, seconds)."""

    async def mark_seen(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> None:
        """Add \\Seen to the messages in ``folder`` (UID ``from_uid`` or more) whose
        ``header`` is ``value``."""

    async def next_uid(self, user: str, folder: str) -> int:
        """The folder's UIDNEXT: every message saved from now on gets this UID or a higher
        one (UIDs only grow), so a search for it may skip the messages below."""


class Filer:
    def __init__(
        self,
        store: FilingStore,
        *,
        clock: Clock,
        sink: MailSink | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self._now = clock.now
        self.sink = sink
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._attached = asyncio.Event()
        if sink is not None:
            self._attached.set()
        self._task: asyncio.Task[None] | None = None
        #: (user, folder) -> UIDNEXT seen at each second (ascending): the floors of searches.
        self._uidnext: dict[tuple[str, str], list[tuple[int, int]]] = {}
        #: Rows queued already *handed* (:meth:`queue` with ``handed``) that no filing pass
        #: has tried yet: nothing of them can be in the mailbox, so they need no lookup.
        self._fresh: set[int] = set()

    # -- wiring ----------------------------------------------------------------------------

    def attach(self, sink: MailSink | None) -> None:
        """The mailbox is ready (or, with None, gone): file what waited, at once."""
        self.sink = sink
        if sink is None:
            self._attached.clear()
        else:
            self._attached.set()
        self.wake()

    async def mailbox_attached(self) -> None:
        """Until a mailbox is attached.  A node starts its devices' syncs before its mailbox
        (Dovecot, started by the gateway), so a first sync can fetch mail that has nowhere
        to go yet; it waits here instead of backing off as from a failure."""
        await self._attached.wait()

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self.store.remove_orphans()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="filer")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        with contextlib.suppress(OnionpostError):  # else a lookup after the restart
            self.store.flush_filed()

    # -- queueing --------------------------------------------------------------------------

    def queue(
        self,
        *,
        key: bytes,
        user: str,
        folder: str,
        message: MessageSource,
        prefix: bytes = b"",
        source: bytes | None = None,
        mark_seen: bool = False,
        unless_message_id: str | None = None,
        wait: int = 0,
        in_database: bool = False,
        handed: bool = False,
    ) -> int | None:
        """Queue ``prefix`` + ``message`` (bytes, a file's path, or an open file read from
        where it stands; durable when the caller's transaction commits); the row id, or None
        if ``key`` was queued before.  The filer looks at it at once, or after ``wait``
        seconds.  With ``in_database`` (bytes, no prefix) the message is kept in the
        database, durable with the caller's COMMIT and without an fsync of its own (see
        :meth:`FilingStore.add`).

        With ``handed`` (inside the caller's transaction, for a row the caller files right
        after its COMMIT with :meth:`settle_many`), the row is stored already marked handed:
        the mark that must be durable before the mailbox sees the message rides the
        caller's COMMIT instead of costing one of its own.  A crash before the filing leaves
        a handed row, which is looked up in the mailbox before being filed, as always."""
        now = self._now()
        filing_id = self.store.add(
            key=key,
            user=user,
            folder=folder,
            message=message,
            prefix=prefix,
            now=now,
            source=source,
            mark_seen=mark_seen,
            unless_message_id=unless_message_id,
            not_before=now + wait if wait else None,
            in_database=in_database,
        )
        if handed and filing_id is not None and not unless_message_id and not wait:
            self.store.set_states([filing_id], HANDED)
            self._fresh.add(filing_id)
        self.wake()
        return filing_id

    # -- filing ----------------------------------------------------------------------------

    async def settle(self, ids: Sequence[int]) -> bool:
        """Try to file these rows now; True once none of them is left (all in the mailbox).

        Rows that are not due yet (a Sent copy waiting for the client's own) count as
        settled: they are durable and the caller has nothing to wait for.
        """
        return not await self.settle_many(ids)

    async def settle_many(self, ids: Sequence[int], *, remove_later: bool = False) -> set[int]:
        """:meth:`settle` for a batch (the rows of several messages): the ids left unfiled.

        The batch costs two commits however many rows it holds (all marked handed, then all
        removed), instead of two per row; see :meth:`_file_batch`.  With ``remove_later``
        (the receiver, whose next batch commits anyway) the rows that reach the mailbox are
        not removed here: :meth:`FilingStore.filed_later` hides them and the caller's next
        transaction removes them (:meth:`FilingStore.forget_filed`), or this filer's loop
        after :data:`REMOVAL_WAIT` seconds of quiet.
        """
        now = self._now()
        rows = [r for r in self.store.get_many(ids) if r.not_before <= now]
        return await self._file_batch(rows, remove_later=remove_later)

    async def run_due(self) -> int:
        """File every row that is due; the number filed."""
        filed = 0
        while rows := self.store.due(self._now()):
            await foreground.yield_to()  # SMTP clients waiting on a 250 go first
            left = await self._file_batch(rows)
            filed += len(rows) - len(left)
            if left:
                break  # the mailbox refuses or is away: the rest waits for the next pass
        return filed

    async def _file_batch(self, rows: Sequence[Filing], *, remove_later: bool = False) -> set[int]:
        """File these rows; the ids of those not done (deferred, or no mailbox attached).

        Exactly once, as for a single row: every row is durably *handed* before the mailbox
        sees a byte of it (one commit for all the plain rows of the batch), and removed only
        after the mailbox's 250 (one commit for all that made it).  A crash in between leaves
        rows handed whose outcome is unknown; they are looked up in the mailbox by their
        header before being filed again, as always.
        """
        async with self._lock:
            # A concurrent pass may have filed some meanwhile: reread them under the lock.
            current = self.store.get_many([r.id for r in rows])
            sink = self.sink
            if sink is None:
                return {r.id for r in current}
            plain = [r.id for r in current if r.state == QUEUED and not r.unless_message_id]
            self.store.set_states(plain, HANDED)
            handed_now = set(plain)
            handed_now.update(r.id for r in current if r.state == HANDED and r.id in self._fresh)
            self._fresh.difference_update(r.id for r in current)
            finished: list[Filing] = []
            left: set[int] = set()
            observed: set[tuple[str, str]] = set()  # folders whose UIDNEXT this batch read
            try:
                for row in current:
                    if await self._file_one(
                        sink, row, handed_now=row.id in handed_now, observed=observed
                    ):
                        finished.append(row)
                    else:
                        left.add(row.id)
            finally:
                # Whatever reached the mailbox is forgotten even if a later row's filing was
                # interrupted (cancellation): left queued it would only cost a lookup.
                if remove_later:
                    self.store.filed_later(finished, self._now())
                else:
                    self.store.done_many(finished)
            for row in finished:
                log.info("filed %s into %s's %s", row.key.hex(), row.user, row.folder)
            return left

    async def _file_one(
        self,
        sink: MailSink,
        row: Filing,
        *,
        handed_now: bool,
        observed: set[tuple[str, str]],
    ) -> bool:
        """Put one row in the mailbox; True when it is done (filed, or its spool file is
        gone), False when deferred.  The caller removes the done rows from the queue.

        Searches of the folder start at a UID floor where one is known (see
        :meth:`_floor_before`), so their cost does not grow with the folder: a message
        saved after the row was created has a UID at least the folder's UIDNEXT seen before
        that.  The client's own Sent copy and a filing left *handed* or *filed* by a crash
        were all saved after the row was created.  A copy to be seen is saved with its flag,
        so the copy just filed needs no search; each batch reads the folder's UIDNEXT once,
        before its first such copy (``observed``), to keep the floors of later rows close.
        """
        value = row.key.hex()
        since_row = self._floor_before(row.user, row.folder, row.created_at)
        try:
            flag_later = row.mark_seen  # saved by an earlier attempt, perhaps unflagged
            if row.state == FILED:
                pass  # in the mailbox; only the flag is missing
            elif (
                not handed_now
                and row.state == HANDED
                and await sink.holds(row.user, row.folder, FILING_HEADER, value, from_uid=since_row)
            ):
                log.info("filing %s was already in %s (a crash came between)", value, row.folder)
            elif row.unless_message_id and await sink.holds(
                row.user, row.folder, "Message-ID", row.unless_message_id, from_uid=since_row
            ):
                log.info("the client saved its own copy in %s; none filed", row.folder)
                return True
            else:
                if not handed_now:
                    self.store.set_state(row.id, HANDED)
                header = f"{FILING_HEADER}: {value}\r\n".encode()
                # Kept in the database (up to 1 MiB): handed over as it was read, no file.
                body = self.store.body(row)
                message: Path | bytes = self.store.path(row.key) if body is None else body
                del body
                if row.mark_seen and (row.user, row.folder) not in observed:
                    # A fresh floor for the client-copy checks of the copies to come.
                    observed.add((row.user, row.folder))
                    await self.observe(sink, row.user, row.folder)
                # Saved with its flag: no search for it, no flag change afterwards.
                await sink.deliver(row.user, row.folder, message, header=header, seen=row.mark_seen)
                del message
                flag_later = False
            if flag_later:  # found in the folder after a crash; flag it if it is not
                self.store.set_state(row.id, FILED)
                await sink.mark_seen(row.user, row.folder, FILING_HEADER, value, from_uid=since_row)
        except FilingRefused as exc:
            # Trying again won't help; keeping it would block nothing but hides the mail.
            # Leave it queued with a long wait so `onionpost doctor` and the log show it.
            log.error("the mailbox refused filing %s into %s: %s", value, row.folder, exc)
            self._defer(row, str(exc), round(FILING.max_delay))
            return False
        except OnionpostError as exc:
            log.warning("filing into %s deferred: %s", row.folder, exc)
            self._defer(row, str(exc), None)
            return False
        except FileNotFoundError:
            log.error("filing %s lost its spool file; dropped", value)
        return True

    async def observe(self, sink: MailSink, user: str, folder: str) -> int:
        """The folder's UIDNEXT now (1 if the mailbox cannot say), remembered with the
        second it was read *after*, as a floor for rows created later.  The gateway reads
        each user's Sent at start, before its SMTP server takes a message."""
        try:
            uid = await sink.next_uid(user, folder)
        except OnionpostError as exc:
            log.debug("no UIDNEXT for %s's %s: %s", user, folder, exc)
            return 1
        seen = self._uidnext.setdefault((user, folder), [])
        at = self._now()
        if seen and seen[-1][0] >= at:
            seen[-1] = (seen[-1][0], min(seen[-1][1], uid))
        else:
            seen.append((at, uid))
            if len(seen) > FLOORS_KEPT:
                del seen[: len(seen) - FLOORS_KEPT]
        return uid

    def _floor_before(self, user: str, folder: str, created_at: int) -> int:
        """The newest UIDNEXT of the folder read in a second *before* ``created_at`` (so
        before the row existed, and before anything saved after it); 1 if none is known
        (after a restart, or a row older than what is kept): a search of the whole folder."""
        seen = self._uidnext.get((user, folder), [])
        i = bisect.bisect_left(seen, (created_at, 0))
        return seen[i - 1][1] if i else 1

    def _defer(self, row: Filing, error: str, wait: int | None) -> None:
        if wait is None:  # row.attempts failed before this one
            wait = FILING.delay(row.attempts + 1, 0.5)
        with contextlib.suppress(OnionpostError):
            self.store.deferred(row.id, error=error, next_try_at=self._now() + wait)

    def _remove_quiet(self) -> None:
        """Remove the filed rows that no batch of the receiver took along within
        :data:`REMOVAL_WAIT` seconds: one commit once mail stops arriving."""
        oldest = self.store.oldest_filed_at()
        if oldest is not None and self._now() - oldest >= REMOVAL_WAIT:
            self.store.flush_filed()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self.sink is not None:
                    await self.run_due()
                self._remove_quiet()
            except OnionpostError as exc:
                log.warning("filing pass failed: %s", exc)
            nxt = self.store.next_due_at()
            oldest = self.store.oldest_filed_at()
            if oldest is not None:
                nxt = min(nxt, oldest + REMOVAL_WAIT) if nxt is not None else oldest + REMOVAL_WAIT
            delay = 30.0 if nxt is None else max(0.05, min(30.0, nxt - self._now()))
            await wait_event(self.clock, self._wake, delay)
