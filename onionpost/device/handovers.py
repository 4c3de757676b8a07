"""Hand-overs to the device's own inbox: envelopes sealed together go in one request.

Every envelope a device seals goes to its own inbox first (the inbox's outbox delivers it).
One ``POST /v1/device/submit`` per envelope cost a request's work on both sides for each
recipient of each message, and for a laptop whose inbox is a Pi at home, a round trip over
tor each.  :class:`HandOvers` is the device's side of ``POST /v1/device/submissions``: the
envelopes handed over while a request is on its way become the next request (the group
commit's scheme, across the network: nothing is held back to fill a batch, an idle device
hands a lone envelope over at once, with the single route).

Each envelope still gets its own answer (its queued row, or the refusal that was its
alone), and a caller hears it only after the inbox's COMMIT that holds it.  The batches
are the reference sender's, as an inbox's outbox makes them (``core.wire.BATCH_ENVELOPES``):
larger envelopes go alone, streamed from their files; the batched ones are copied into the
request (at most 16 x 256 KiB).  An inbox that does not serve the route
(404: older than this device) gets one request per envelope, and is asked again an hour
later (it may have been upgraded meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from onionpost.core.errors import OnionpostError
from onionpost.core.retry import worth_retrying
from onionpost.core.wire import (
    ASK_BATCHES_AGAIN_AFTER,
    BATCH_ENVELOPES,
    BATCHED_ENVELOPE_MAX,
    HandOverFields,
)
from onionpost.net.client import DeviceSession, Rewindable

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    fields: HandOverFields
    envelope: bytes
    future: asyncio.Future[int]


class HandOvers:
    def __init__(self, session: DeviceSession) -> None:
        self.session = session
        self._queue: list[_Waiting] = []
        self._runner: asyncio.Task[None] | None = None
        #: Until this time (the loop's clock), the inbox takes one envelope per request.
        self._singles_until = 0.0

    async def submit(self, fields: HandOverFields, envelope: tuple[Rewindable, int]) -> int:
        """Hand ``envelope`` (its file at its start, and its length) over; its queued row's
        id once the inbox has it durably, or the error that refused it."""
        source, size = envelope
        loop = asyncio.get_running_loop()
        if size > BATCHED_ENVELOPE_MAX or loop.time() < self._singles_until:
            return await self._one(fields, envelope)
        waiting = _Waiting(fields, source.read(size), loop.create_future())
        self._queue.append(waiting)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="hand-overs")
        # A caller that gives up (cancelled) cancels its future: a batch not yet formed
        # leaves it out; one already sent may still queue it at the inbox, which answers
        # the same key with the same row when the message is sealed again.
        return await waiting.future

    async def _one(self, fields: HandOverFields, envelope: bytes | tuple[Rewindable, int]) -> int:
        return await self.session.submit(
            destination=fields.destination,
            envelope=envelope,
            msg_id=fields.msg_id,
            expires_at=fields.expires_at,
            ref=fields.ref,
            key=fields.key,
        )

    async def _run(self) -> None:
        """Send batches until none is waiting; each is what queued while the last went."""
        while self._queue:
            batch = [w for w in self._queue[:BATCH_ENVELOPES] if not w.future.done()]
            del self._queue[:BATCH_ENVELOPES]
            try:
                outcomes = await self._send(batch) if batch else []
            except Exception as exc:  # not a refusal (those are outcomes): each caller hears it
                outcomes = [exc] * len(batch)
            except BaseException:
                # The device stops (cancelled): no one hears success they did not get.
                self._cancel_waiting(batch)
                raise
            for w, outcome in zip(batch, outcomes, strict=True):
                if w.future.done():
                    continue
                if isinstance(outcome, BaseException):
                    w.future.set_exception(outcome)
                else:
                    w.future.set_result(outcome)

    def _cancel_waiting(self, batch: list[_Waiting]) -> None:
        for w in batch + self._queue:
            if not w.future.done():
                w.future.cancel()
        self._queue = []

    async def close(self) -> None:
        """Stop handing over (the device stops): the callers still waiting are cancelled;
        what the inbox already queued stays queued (a repeated key finds it again)."""
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._cancel_waiting([])

    async def _send(self, batch: list[_Waiting]) -> list[int | BaseException]:
        if len(batch) > 1:
            try:
                results = await self.session.submit_many([(w.fields, w.envelope) for w in batch])
            except OnionpostError as exc:
                if worth_retrying(exc):
                    return [exc] * len(batch)  # each is retried, as a single one would be
                log.info("the inbox refused several hand-overs at once (%s); one at a time", exc)
                results = None
            else:
                if results is None:
                    log.info("the inbox takes one hand-over at a time")
                    self._singles_until = (
                        asyncio.get_running_loop().time() + ASK_BATCHES_AGAIN_AFTER
                    )
            if results is not None:
                return list(results)
        return list(
            await asyncio.gather(
                *(self._one(w.fields, w.envelope) for w in batch), return_exceptions=True
            )
        )
