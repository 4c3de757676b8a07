"""Render ENVELOPEs ahead of the client: a mail client's first sync FETCHes the ENVELOPE of
every message, and parsing thousands of headers then is what made it slow.

The gateway runs in the node that files the mail, so whenever the store reports new mail the
warmer renders the missing envelopes in the background, a batch at a time, yielding to the
event loop between batches.  The store only keeps the bytes; rendering stays here, with pymap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from gateway.imap.messages import render_envelope
from onionpost.errors import OnionpostError
from onionpost.store.mailbox import MailboxStore

log = logging.getLogger(__name__)
BATCH = 200


class EnvelopeWarmer:
    def __init__(self, store: MailboxStore) -> None:
        self._store = store
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._wake.set()  # mail filed before the gateway started
        self._task = asyncio.get_running_loop().create_task(self._run(), name="envelope-warmer")

    def poke(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                while await self._batch():
                    await asyncio.sleep(0)  # let IMAP and SMTP sessions run in between
            except OnionpostError as exc:
                log.warning("could not prepare envelopes ahead of time: %s", exc)

    async def _batch(self) -> int:
        body_ids = self._store.bodies_without_envelope(BATCH)
        for body_id in body_ids:
            self._store.cache_envelope(body_id, render_envelope(self._store.header(body_id)))
        self._store.flush_cache()
        return len(body_ids)
