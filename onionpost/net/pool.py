"""Keep-alive connections to other inboxes: one small pool per destination.

Every request to another inbox used to open a new stream through tor and close it after one
answer.  On a warm circuit that stream costs a SOCKS handshake and a RELAY_BEGIN round trip to
the onion service (~40 ms on the private test network, more on the real one); when the
circuit has gone, a whole rendezvous (hundreds of milliseconds to seconds).  The pool keeps
the connection after a complete HTTP/1.1 exchange and hands it to the next request for the
same destination, so a burst of deliveries to one inbox, or a key fetch followed by the
delivery it was for, pays the stream once.

Rules, each for a reason:

* **Never shared across destinations or roles.**  Connections are keyed by
  ``(onion, port, isolation)``, exactly what picks tor's circuit (``tor.isolation_username``),
  so reuse never links traffic that separate circuits would have kept apart.
* **Bounded.**  At most ``max_idle`` idle connections per destination and ``max_destinations``
  destinations with idle connections (the least recently used goes first); connections in use
  are bounded by the caller (the outbox's concurrency).  Each idle connection also holds a
  slot of the peer's connection cap (256 by default), so the pool keeps them briefly, and no
  more than the outbox uses at once: the node sets ``max_idle`` to its delivery concurrency
  (8 by default).  With fewer, every pass of a burst to one inbox closed the streams over
  the limit and opened them again (one new stream per eight deliveries in the drain bench,
  each a RELAY_BEGIN round trip through tor; docs/performance.md).
* **Short idle life.**  An idle connection is closed after ``idle_timeout`` seconds, shorter
  than the inbox's own idle cut-off (``inbox.header_timeout``, 15 s by default), so the pool
  normally closes first; the rare request that still meets a connection the peer just closed
  is retried once on a fresh one by :class:`~onionpost.net.client.InboxClient`.
* **Closed on errors and on stop.**  A connection whose exchange failed in any way is closed,
  never returned; :meth:`close` (the node's stop, on SIGTERM) closes every idle one.

The pool only hands out streams: whether an exchange left the connection reusable is the HTTP
client's call (:meth:`release`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from onionpost.core.errors import OnionpostError
from onionpost.net.transport import Dialer

Key = tuple[str, int, str]


def peer_isolation(onion: str) -> str:
    """The circuit role for everything this node asks of another inbox on a message's
    behalf: fetching the recipient's keys and delivering to it.  One role, so the fetch and
    the delivery right after it share a circuit and a kept-alive connection; the inbox
    learns nothing from that it could not tell from their timing.  Other roles (probing,
    enrolment, a device's own inbox) keep circuits of their own."""
    return f"peer:{onion}"


@dataclass(eq=False)
class PooledConnection:
    """One stream to one destination; ``reused`` says it waited idle in the pool (after an
    exchange, or pre-warmed), so the peer may have closed it meanwhile."""

    key: Key
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    uses: int = 0
    reused: bool = False
    _timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    def usable(self) -> bool:
        """Whether the idle stream still looks open: the peer has not closed it (EOF) and
        sent nothing unasked (which would desynchronise the next answer)."""
        return not (
            self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(OSError, RuntimeError):  # RuntimeError: the loop has closed
            self.writer.close()


@dataclass
class PoolStats:
    """Counters for tests, the bench and the logs."""

    opened: int = 0
    reused: int = 0
    expired: int = 0
    discarded: int = 0
    warmed: int = 0
    #: Connections opened per destination onion (a node's pool serves its devices' own
    #: inbox as well as every peer, so the total alone says little about one peer).
    opened_to: Counter[str] = field(default_factory=Counter)

    def open(self, onion: str) -> None:
        self.opened += 1
        self.opened_to[onion] += 1


class ConnectionPool:
    """Idle keep-alive streams per ``(onion, port, isolation)``, opened through ``dialer``."""

    def __init__(
        self,
        dialer: Dialer,
        *,
        max_idle: int = 8,
        max_destinations: int = 64,
        idle_timeout: float = 10.0,
    ) -> None:
        self.dialer = dialer
        self.max_idle = max_idle
        self.max_destinations = max_destinations
        self.idle_timeout = idle_timeout
        self.stats = PoolStats()
        self._idle: OrderedDict[Key, list[PooledConnection]] = OrderedDict()
        self._warming: dict[Key, asyncio.Task[None]] = {}
        self._warm_failures: dict[Key, OnionpostError] = {}
        self._closed = False

    def idle_count(self, onion: str | None = None) -> int:
        return sum(len(v) for k, v in self._idle.items() if onion is None or k[0] == onion)

    async def acquire(
        self, onion: str, port: int, *, isolation: str, timeout: float
    ) -> PooledConnection:
        """An idle connection to the destination if one is still open, else the one being
        pre-warmed for it (already under way: waiting for it beats starting a second),
        else a new one."""
        key = (onion, port, isolation)
        for _ in range(2):
            while (conn := self._pop(key)) is not None:
                if conn.usable():
                    self.stats.reused += 1
                    return conn
                self.stats.expired += 1
                conn.close()
            warming = self._warming.get(key)
            if warming is None:
                break
            # wait() does not cancel the warm-up when this caller is cancelled
            await asyncio.wait({warming})
            failed = self._warm_failures.pop(key, None)
            if failed is not None:
                # The dial this request would make has just failed, started earlier: the same
                # answer now, instead of a second full attempt (a peer that is down would
                # otherwise cost two connect timeouts per delivery).
                raise failed
        reader, writer = await self.dialer.open(onion, port, isolation=isolation, timeout=timeout)
        self.stats.open(onion)
        return PooledConnection(key, reader, writer)

    def release(self, conn: PooledConnection, *, reusable: bool) -> None:
        """Give a connection back after an exchange; kept only if ``reusable`` and room."""
        conn.uses += 1
        if self._closed or not reusable or not conn.usable():
            self.discard(conn)
            return
        self._park(conn)

    def discard(self, conn: PooledConnection) -> None:
        """Close a connection that failed or that the HTTP exchange left unusable."""
        self.stats.discarded += 1
        conn.close()

    def warm(self, onion: str, port: int, *, isolation: str, timeout: float) -> None:
        """Open a connection to the destination in the background, unless one is idle or
        being opened: mail for it is on its way (being sealed), so the circuit and the stream
        are built while the message is, not after.  A failure is handed to a request that was
        waiting for this connection, if one was; it costs nothing here."""
        key = (onion, port, isolation)
        if self._closed or key in self._warming or self._idle.get(key):
            return
        self._warm_failures.pop(key, None)

        async def run() -> None:
            try:
                reader, writer = await self.dialer.open(
                    onion, port, isolation=isolation, timeout=timeout
                )
            except OnionpostError as exc:  # for a request waiting on this warm-up
                self._warm_failures[key] = exc
                return
            except Exception:
                return
            finally:
                self._warming.pop(key, None)
            self.stats.open(onion)
            self.stats.warmed += 1
            conn = PooledConnection(key, reader, writer)
            if self._closed:
                conn.close()
            else:
                self._park(conn)

        self._warming[key] = asyncio.get_running_loop().create_task(run(), name="pool-warm")

    def reopen(self) -> None:
        """Keep connections again after :meth:`close` (a node stopped and started again
        keeps its one pool; nothing from before the stop is in it)."""
        self._closed = False

    async def close(self) -> None:
        """Close every idle connection and stop warming (the node is stopping)."""
        self._closed = True
        tasks = list(self._warming.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._warming.clear()
        self._warm_failures.clear()
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    # -- internals ------------------------------------------------------------------------

    def _pop(self, key: Key) -> PooledConnection | None:
        conns = self._idle.get(key)
        if not conns:
            return None
        conn = conns.pop()  # the most recently used: the least likely to have timed out
        if not conns:
            del self._idle[key]
        if conn._timer is not None:
            conn._timer.cancel()
            conn._timer = None
        return conn

    def _park(self, conn: PooledConnection) -> None:
        conns = self._idle.setdefault(conn.key, [])
        self._idle.move_to_end(conn.key)
        if len(conns) >= self.max_idle:
            self.discard(conn)
            return
        conns.append(conn)
        conn.reused = True
        conn._timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._expire, conn)
        while len(self._idle) > self.max_destinations:
            _, oldest = self._idle.popitem(last=False)
            for old in oldest:
                self.stats.expired += 1
                old.close()

    def _expire(self, conn: PooledConnection) -> None:
        conn._timer = None
        conns = self._idle.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[conn.key]
        self.stats.expired += 1
        conn.close()
