"""Fixtures for tests that need the private Tor network on loopback.

``tests/tor/conftest.py`` imports them.  To share one network between several test
directories in one pytest run, import them from ``tests/conftest.py`` instead (a second import
in a sub-directory conftest would define a second, separate network).

* ``tor_network`` (session): a started :class:`~onionpost.testing.tornet.TorNetwork`;
  ``tor_network.tor_config(**overrides)`` is a launch-mode ``TorConfig`` for a node on it.
* ``tor_launcher`` (per test, session event loop): ``await tor_launcher(**overrides)`` starts a
  :class:`~onionpost.net.tor.runtime.TorRuntime` on the network in a fresh directory (or
  ``data_dir=``) and
  stops it after the test.
* ``tor_client`` (session, session event loop): one launched runtime to dial from.
* ``http_target`` (session, session event loop): a tiny HTTP server on 127.0.0.1 that answers
  every request with 200 and the request line; ``.port`` and ``.requests``.

Async tests that use the session-loop fixtures need ``pytest.mark.asyncio(loop_scope="session")``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from onionpost.base.clock import SystemClock
from onionpost.net.tor.runtime import TorRuntime
from onionpost.testing.tornet import TorNetwork

NETWORK_TIMEOUT = float(os.environ.get("ONIONPOST_TORNET_TIMEOUT", "150"))

#: Measured durations (seconds) that the tor tests print at the end of the run.
TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="session")
def tor_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorNetwork]:
    if shutil.which("tor") is None or shutil.which("tor-gencert") is None:
        pytest.fail("tor is not installed: run `sudo apt-get install tor` (make test does this).")
    net = TorNetwork(tmp_path_factory.mktemp("tornet"), interval=10)
    try:
        net.start(timeout=NETWORK_TIMEOUT)  # stops everything it launched if it fails
        TIMINGS.update({f"network {k}": v for k, v in net.timings.items()})
        yield net
    finally:
        net.stop()


Launcher = Callable[..., Awaitable[TorRuntime]]


@pytest_asyncio.fixture(loop_scope="session")
async def tor_launcher(
    tor_network: TorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Launcher]:
    started: list[TorRuntime] = []

    async def launch(data_dir: Path | None = None, **overrides: Any) -> TorRuntime:
        directory = data_dir or tmp_path_factory.mktemp("node")
        t0 = time.monotonic()
        runtime = await TorRuntime.start(
            tor_network.tor_config(**overrides), directory, clock=SystemClock()
        )
        TIMINGS.setdefault("launch+bootstrap (first)", time.monotonic() - t0)
        started.append(runtime)
        return runtime

    try:
        yield launch
    finally:
        for runtime in started:
            await runtime.stop()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def tor_client(
    tor_network: TorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[TorRuntime]:
    t0 = time.monotonic()
    runtime = await TorRuntime.start(
        tor_network.tor_config(), tmp_path_factory.mktemp("client"), clock=SystemClock()
    )
    TIMINGS["client launch+bootstrap"] = time.monotonic() - t0
    try:
        yield runtime
    finally:
        await runtime.stop()


@dataclass
class HttpTarget:
    port: int
    requests: list[bytes] = field(default_factory=list)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def http_target() -> AsyncIterator[HttpTarget]:
    target = HttpTarget(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).strip()
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            target.requests.append(request_line)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(request_line), request_line)
            )
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    target.port = server.sockets[0].getsockname()[1]
    try:
        yield target
    finally:
        server.close()
        await server.wait_closed()
