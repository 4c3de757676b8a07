"""A launched tor on the private network: bootstrap, publish, PoW, dial, remove, recover."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time

import pytest

from onionpost.core.address import onion_from_public_key
from onionpost.core.crypto.primitives import ed25519_public
from onionpost.core.errors import PeerUnreachable
from onionpost.net.tor.runtime import TorRuntime
from onionpost.net.tor.socks import TorDialer
from tests.tor.network import TIMINGS, HttpTarget, Launcher

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def http_get(
    dialer: TorDialer, onion: str, path: str = "/v1/health", *, timeout: float = 60.0
) -> bytes:
    reader, writer = await dialer.open(onion, 80, isolation="test", timeout=timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {onion}.onion\r\n\r\n".encode())
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_launched_tor_bootstraps_on_the_private_network(tor_client: TorRuntime) -> None:
    status = tor_client.status()
    assert status.mode == "launch"
    assert status.version is not None and status.version.startswith("0.4.")
    assert (status.bootstrap_percent, status.bootstrap_summary) == (100, "Done")
    assert status.socks is not None and status.socks.startswith("127.0.0.1:")
    assert status.onion is None and not status.published
    assert status.last_error is None


async def test_generated_torrc_keeps_tor_private_and_owned(tor_launcher: Launcher) -> None:
    runtime = await tor_launcher()
    tor_dir = runtime._tor_dir  # white-box: where the torrc of a launched tor lives
    assert stat.S_IMODE(tor_dir.stat().st_mode) == 0o700
    torrc = (tor_dir / "torrc").read_text()
    assert "SocksPort 127.0.0.1:auto ExtendedErrors" in torrc
    assert "ControlPort 127.0.0.1:auto" in torrc
    assert f"__OwningControllerProcess {os.getpid()}" in torrc
    assert "TestingTorNetwork 1" in torrc  # extra_torrc from the network was appended


async def test_publish_gives_the_seed_address_with_pow(
    tor_launcher: Launcher, tor_client: TorRuntime, http_target: HttpTarget
) -> None:
    server = await tor_launcher()
    seed = os.urandom(32)
    t0 = time.monotonic()
    onion = await server.publish_service(seed, "127.0.0.1", http_target.port)
    TIMINGS["publish (ADD_ONION to 3 uploads)"] = time.monotonic() - t0

    assert onion == onion_from_public_key(ed25519_public(seed))
    status = server.status()
    assert status.onion == onion and status.published and status.last_published
    assert status.pow_enabled and status.pow_note is None
    # Not only accepted by ADD_ONION: the published descriptor carries the PoW parameters.
    params = await server.published_pow_params()
    assert params is not None and params.startswith("v1 ")

    t0 = time.monotonic()
    answer = await http_get(TorDialer(tor_client), onion)
    TIMINGS["first connect + HTTP round trip"] = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"GET /v1/health HTTP/1.1")
    assert tor_client.status().last_outbound is not None

    assert await server.probe_self()
    assert server.status().last_probe_ok is True
    server.note_inbound()
    assert server.status().last_inbound is not None


async def test_same_seed_same_address_after_restart_and_removed_service_is_unreachable(
    tor_launcher: Launcher,
    tor_client: TorRuntime,
    http_target: HttpTarget,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    data_dir = tmp_path_factory.mktemp("restart")
    seed = os.urandom(32)
    dialer = TorDialer(tor_client)

    first = await tor_launcher(data_dir=data_dir)
    onion = await first.publish_service(seed, "127.0.0.1", http_target.port)
    assert (await http_get(dialer, onion)).startswith(b"HTTP/1.1 200")

    await first.remove_service()
    assert first.status().onion is None and not first.status().published
    t0 = time.monotonic()
    with pytest.raises(PeerUnreachable) as caught:
        await http_get(dialer, onion, timeout=30)
    TIMINGS["removed service -> PeerUnreachable"] = time.monotonic() - t0
    words = str(caught.value)
    assert words.endswith(".") and "Traceback" not in words and "0x" not in words
    assert "inbox" in words or "onion" in words

    await first.stop()
    second = await tor_launcher(data_dir=data_dir)
    assert await second.publish_service(seed, "127.0.0.1", http_target.port) == onion
    t0 = time.monotonic()
    assert (await http_get(dialer, onion, timeout=90)).startswith(b"HTTP/1.1 200")
    TIMINGS["reconnect after service restart"] = time.monotonic() - t0


async def test_check_health_restarts_a_killed_tor(
    tor_launcher: Launcher, tor_client: TorRuntime, http_target: HttpTarget
) -> None:
    server = await tor_launcher()
    onion = await server.publish_service(os.urandom(32), "127.0.0.1", http_target.port)
    dialer = TorDialer(tor_client)
    assert (await http_get(dialer, onion)).startswith(b"HTTP/1.1 200")

    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    await server.check_health()
    TIMINGS["recovery (restart + republish)"] = time.monotonic() - t0

    status = server.status()
    assert status.restarts == 1 and status.published and status.onion == onion
    assert status.last_recovery is not None and "restarted tor" in status.last_recovery
    assert status.last_error is not None and "SIGKILL" in status.last_error
    t0 = time.monotonic()
    assert (await http_get(dialer, onion, timeout=90)).startswith(b"HTTP/1.1 200")
    TIMINGS["reconnect after tor was killed"] = time.monotonic() - t0
    assert await server.probe_self()

    # A healthy node stays as it is.
    await server.check_health()
    assert server.status().restarts == 1


async def test_check_health_restarts_tor_after_the_control_connection_was_lost(
    tor_launcher: Launcher, http_target: HttpTarget
) -> None:
    server = await tor_launcher()
    onion = await server.publish_service(os.urandom(32), "127.0.0.1", http_target.port)
    # White-box: drop the control connection.  A launched tor is owned by that connection
    # (TAKEOWNERSHIP), so it exits; the repair is a restart with the same address.
    await asyncio.to_thread(server._controller.close)

    await server.check_health()
    status = server.status()
    assert status.restarts == 1 and status.published and status.onion == onion
    assert status.last_recovery is not None and "restarted tor" in status.last_recovery
    assert await server.probe_self()


async def test_self_probe_restarts_tor_when_the_onion_stalls(
    tor_launcher: Launcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service whose streams open but never answer looks, from inside, like stalled onion
    # delivery: only repeated probes through the Tor network notice it.
    monkeypatch.setattr("onionpost.net.tor.runtime._PROBE_TIMEOUT", 2.0)
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server_socket = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        server = await tor_launcher(self_probe_interval=1)
        port = server_socket.sockets[0].getsockname()[1]
        await server.publish_service(os.urandom(32), "127.0.0.1", port)
        for attempt in range(3):
            if attempt:
                await asyncio.sleep(1.05)  # self_probe_interval
            await server.check_health()
        status = server.status()
        assert status.last_probe_ok is False and status.restarts == 1 and status.healthy
        assert status.last_recovery is not None
        assert "unreachable through its own onion address" in status.last_recovery
    finally:
        for writer in held:
            writer.close()
        server_socket.close()
        await server_socket.wait_closed()


async def test_a_long_tor_log_is_set_aside_and_tor_goes_on(
    tor_launcher: Launcher, tor_client: TorRuntime, http_target: HttpTarget
) -> None:
    """tor reopens its log on RELOAD; its SOCKS port, control connection and the inbox's
    ephemeral onion service all outlive it."""
    server = await tor_launcher()
    onion = await server.publish_service(os.urandom(32), "127.0.0.1", http_target.port)
    server.LOG_LIMIT = 4096
    log = server._tor_dir / "notice.log"  # white-box: where a launched tor logs
    aside = log.with_name("notice.log.1")
    socks = server.socks_endpoint()
    with log.open("ab") as f:
        f.write(b"padding from the test\n" * 400)
    assert await server.rotate_log()
    assert b"padding from the test" in aside.read_bytes()
    for _ in range(300):  # tor handles the signal in its own time
        if log.exists() and b"opening new log file" in log.read_bytes():
            break
        await asyncio.sleep(0.1)
    assert b"padding from the test" not in log.read_bytes()
    assert b"opening new log file" in log.read_bytes()
    assert await server.rotate_log() is False  # the new file is small
    assert server.socks_endpoint() == socks
    await server.check_health()
    assert server.status().last_error is None and server.status().published
    answer = await http_get(TorDialer(tor_client), onion, timeout=90)
    assert answer.startswith(b"HTTP/1.1 200 OK")
