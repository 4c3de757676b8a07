"""How the API client reaches an inbox: the seam between HTTP and the network.

Production dials through tor (``onionpost.net.tor.socks.TorDialer``); tests and ``tor.mode = "off"``
use :class:`DirectDialer`, which maps onion labels to loopback ports.  The client code above
is the same either way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol

from onionpost.core.errors import PeerUnreachable

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Dialer(Protocol):
    async def open(self, onion: str, port: int, *, isolation: str, timeout: float) -> Streams:
        """Connect to ``<onion>.onion:port``; ``isolation`` names the circuit to use."""
        ...


class DirectDialer:
    """Onion label -> ``host:port`` on this machine, else the ``fallback`` dialer (tor).

    With no fallback it serves tests and the offline demo; with tor as the fallback it keeps
    a node's traffic with its own inbox on loopback instead of a pointless trip through tor.
    """

    def __init__(
        self, routes: Mapping[str, str] | None = None, *, fallback: Dialer | None = None
    ) -> None:
        self.routes: dict[str, str] = dict(routes or {})
        self.fallback = fallback

    def add(self, onion: str, host: str, port: int) -> None:
        self.routes[onion] = f"{host}:{port}"

    async def open(self, onion: str, port: int, *, isolation: str, timeout: float) -> Streams:
        target = self.routes.get(onion)
        if target is None:
            if self.fallback is not None:
                return await self.fallback.open(onion, port, isolation=isolation, timeout=timeout)
            raise PeerUnreachable(
                f"No route to {onion}.onion: tor is off and the inbox is not on this machine."
            )
        host, _, p = target.rpartition(":")
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            async with asyncio.timeout(timeout):
                return await asyncio.open_connection(host, int(p))
        except TimeoutError as exc:
            raise PeerUnreachable("The recipient's inbox did not answer in time.") from exc
        except OSError as exc:
            raise PeerUnreachable(
                f"The recipient's inbox is offline ({exc.strerror or 'connection refused'})."
            ) from exc
