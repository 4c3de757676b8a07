"""Attach mode against a tor we start ourselves, as a system tor would run; start-up errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from onionpost.base.clock import SystemClock
from onionpost.base.config import TorConfig
from onionpost.core.errors import TorAuthError, TorControlError, TorError, TorNotInstalled
from onionpost.net.tor.runtime import TorRuntime
from onionpost.net.tor.socks import TorDialer
from onionpost.testing.ports import free_port
from onionpost.testing.tornet import TorNetwork
from tests.tor.network import HttpTarget

pytestmark = pytest.mark.asyncio(loop_scope="session")

PASSWORD = "correct horse battery staple"


@dataclass
class SystemTor:
    control_port: int
    control_socket: Path
    data_dir: Path


@pytest.fixture(scope="module")
def system_tor(
    tor_network: TorNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SystemTor]:
    """A tor with ControlPort, ControlSocket, cookie and password auth, like a system tor."""
    d = tmp_path_factory.mktemp("systor")
    # Exits when pytest does, and tor exits with it, even if pytest is killed.
    watchdog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import os, time\nwhile os.getppid() == {os.getpid()}: time.sleep(1)",
        ]
    )
    d.chmod(0o700)
    hashed = (
        subprocess.run(
            ["tor", "--hash-password", PASSWORD, "--quiet"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    (d / "empty").touch()
    torrc = d / "torrc"
    torrc.write_text(
        "\n".join(
            [
                f"DataDirectory {d}",
                "SocksPort 127.0.0.1:auto ExtendedErrors",
                "ControlPort 127.0.0.1:auto",
                f"ControlPortWriteToFile {d / 'control-port'}",
                f"ControlSocket {d / 'control'}",
                "CookieAuthentication 1",
                f"HashedControlPassword {hashed}",
                f"Log notice file {d / 'notice.log'}",
                # Not our own pid: stem would then take ownership of this tor and it would
                # exit with the first closed control connection, unlike a system tor.
                f"__OwningControllerProcess {watchdog.pid}",
                *tor_network.client_torrc_lines(),
            ]
        )
        + "\n"
    )
    proc = subprocess.Popen(
        ["tor", "-f", str(torrc), "--defaults-torrc", str(d / "empty")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        port_file = d / "control-port"
        while not (port_file.exists() and "PORT=" in port_file.read_text()):
            assert proc.poll() is None, f"the test tor exited: see {d / 'notice.log'}"
            assert time.monotonic() < deadline, "the test tor did not open its control port"
            time.sleep(0.1)
        match = re.search(r"PORT=127\.0\.0\.1:(\d+)", port_file.read_text())
        assert match
        yield SystemTor(int(match.group(1)), d / "control", d)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        watchdog.kill()
        watchdog.wait()


async def start(cfg: TorConfig, data_dir: Path) -> TorRuntime:
    return await TorRuntime.start(cfg, data_dir, clock=SystemClock())


async def test_attach_by_control_port_with_cookie_publishes_and_reconnects(
    system_tor: SystemTor,
    tor_client: TorRuntime,
    http_target: HttpTarget,
    tmp_path: Path,
) -> None:
    cfg = TorConfig(mode="attach", control_port=system_tor.control_port, bootstrap_timeout=60)
    runtime = await start(cfg, tmp_path)
    try:
        status = runtime.status()
        assert status.mode == "attach" and status.bootstrap_percent == 100
        assert runtime.pid is None and status.socks is not None
        assert status.notes == ()  # the SocksPort has ExtendedErrors

        onion = await runtime.publish_service(os.urandom(32), "127.0.0.1", http_target.port)
        assert runtime.status().pow_enabled  # same binary on PATH: the pow module is checked

        # White-box: drop the control connection; the system tor stays, the service goes.
        await asyncio.to_thread(runtime._controller.close)
        await runtime.check_health()
        status = runtime.status()
        assert status.last_recovery is not None and "reconnected to tor" in status.last_recovery
        assert status.published and status.restarts == 0

        reader, writer = await TorDialer(tor_client).open(
            onion, 80, isolation="attach-test", timeout=60
        )
        writer.write(b"GET /attached HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 200 OK")
        writer.close()
        await writer.wait_closed()
    finally:
        await runtime.stop()


async def test_attach_by_control_socket_with_password(
    system_tor: SystemTor, tmp_path: Path
) -> None:
    cfg = TorConfig(
        mode="attach",
        control_socket=str(system_tor.control_socket),
        control_password=PASSWORD,
        bootstrap_timeout=60,
    )
    runtime = await start(cfg, tmp_path)
    try:
        assert runtime.status().bootstrap_percent == 100
    finally:
        await runtime.stop()


async def test_wrong_control_password_is_a_tor_auth_error(
    system_tor: SystemTor, tmp_path: Path
) -> None:
    cfg = TorConfig(mode="attach", control_port=system_tor.control_port, control_password="wrong")
    with pytest.raises(TorAuthError) as caught:
        await start(cfg, tmp_path)
    assert "password" in str(caught.value) and "wrong" not in str(caught.value)


async def test_unreachable_control_socket_is_a_tor_control_error(tmp_path: Path) -> None:
    path = tmp_path / "no-such" / "control"
    with pytest.raises(TorControlError) as caught:
        await start(TorConfig(mode="attach", control_socket=str(path)), tmp_path)
    assert not isinstance(caught.value, TorAuthError)
    assert str(path) in str(caught.value) and "ControlSocket" in str(caught.value)


async def test_unreachable_control_port_is_a_tor_control_error(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(TorControlError) as caught:
        await start(TorConfig(mode="attach", control_port=port), tmp_path)
    assert f"127.0.0.1:{port}" in str(caught.value) and "ControlPort" in str(caught.value)


async def test_missing_tor_binary_is_tor_not_installed(tmp_path: Path) -> None:
    with pytest.raises(TorNotInstalled) as caught:
        await start(TorConfig(tor_binary="/nonexistent/tor"), tmp_path)
    assert "apt-get install tor" in str(caught.value)


async def test_a_bad_extra_torrc_line_is_reported_in_words(tmp_path: Path) -> None:
    cfg = TorConfig(extra_torrc=("NoSuchTorOption 1",), bootstrap_timeout=30)
    with pytest.raises(TorError) as caught:
        await start(cfg, tmp_path)
    assert "NoSuchTorOption" in str(caught.value)
