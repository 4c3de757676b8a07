"""What all IMAP sessions share: a change event per user, selection state, open sessions.

The mailbox store calls :meth:`Hub._changed` after every commit; the per-user event it
pulses is what an IDLE session waits on, so new mail is announced within milliseconds.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from pymap.concurrent import Event
from pymap.selected import SelectedSet

from gateway.imap.warm import EnvelopeWarmer
from onionpost.store.mailbox import MailboxStore


class Hub:
    """Per-user change events, the shared SelectedSets, and the open sessions."""

    def __init__(self, store: MailboxStore, loop: asyncio.AbstractEventLoop) -> None:
        self._store = store
        self.store = store
        self._loop = loop
        self._thread = threading.get_ident()
        self._events: dict[str, Event] = {}
        self._selected_sets: dict[int, SelectedSet] = {}
        self.sessions: set[asyncio.Task[Any]] = set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.warmer = EnvelopeWarmer(store)
        store.add_listener(self._changed)

    def close(self) -> None:
        self._store.remove_listener(self._changed)

    def event(self, user: str) -> Event:
        event = self._events.get(user)
        if event is None:
            event = self._events[user] = Event.for_asyncio()
        return event

    def selected_set(self, folder_id: int) -> SelectedSet:
        selected_set = self._selected_sets.get(folder_id)
        if selected_set is None:
            selected_set = self._selected_sets[folder_id] = SelectedSet()
        return selected_set

    def _changed(self, user: str, folder: str) -> None:
        if threading.get_ident() == self._thread:
            self._pulse(user)
        else:
            self._loop.call_soon_threadsafe(self._pulse, user)

    def _pulse(self, user: str) -> None:
        self.warmer.poke()
        event = self._events.get(user)
        if event is not None:
            event.set()  # wakes every waiter that is listening now...
            event.clear()  # ...and arms it again for the next change
