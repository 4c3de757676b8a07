"""Dovecot and the SMTP front start at the same time; a node starts with both or neither.

When either cannot start (here: its port is taken), the node's start fails with the error
that names the setting, and neither process is left running.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.service import start_gateway
from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load
from onionpost.core.errors import ListenError, MailServerError

from .test_enrolment import eventually, free_port, tor_off, write_config


def processes_of(home: Path) -> list[int]:
    """Live processes whose command line names ``home`` (Dovecot's configuration is in it,
    the SMTP front's is passed as an argument and names its TLS directory)."""
    found = []
    needle = str(home).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry))
    return found


@pytest.fixture
def taken() -> Iterator[tuple[int, socket.socket]]:
    """A port some other program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1], s


#: The node binds SMTP's port itself (ListenError names the setting); Dovecot binds IMAP's.
ERRORS = {"smtp_port": ListenError, "imap_port": MailServerError}


@pytest.mark.parametrize("setting", sorted(ERRORS))
async def test_a_taken_port_fails_the_start_and_leaves_nothing_running(
    mail_tmp: Path, taken: tuple[int, socket.socket], setting: str
) -> None:
    home = mail_tmp / "alice"
    port = taken[0]
    ports = {"smtp_port": 0, "imap_port": 0, "autoconfig_port": 0, setting: port}
    gateway = "[gateway]\n" + "".join(f"{k} = {v}\n" for k, v in ports.items())
    write_config(home, tor_off({}, f"listen_port = {free_port()}\n"))
    initialize(load(home), local="alice", device_name="pi", now=int(SystemClock().now()))
    write_config(home, tor_off({}, f"listen_port = {free_port()}\n") + gateway)
    node = Node(load(home), extensions=(start_gateway,))
    with pytest.raises(ERRORS[setting]) as caught:
        await node.start()
    if setting == "smtp_port":
        assert f"[gateway] {setting}" in str(caught.value)
    else:
        assert "Dovecot exited" in str(caught.value)
    await eventually(lambda: not processes_of(home), "no Dovecot and no SMTP front left")


async def test_the_node_starts_with_both_and_stops_both(mail_tmp: Path) -> None:
    home = mail_tmp / "alice"
    write_config(home, tor_off({}, f"listen_port = {free_port()}\n"))
    initialize(load(home), local="alice", device_name="pi", now=int(SystemClock().now()))
    gateway = "[gateway]\nsmtp_port = 0\nimap_port = 0\nautoconfig_port = 0\n"
    write_config(home, tor_off({}, f"listen_port = {free_port()}\n") + gateway)
    node = Node(load(home), extensions=(start_gateway,))
    await node.start()
    try:
        assert len(processes_of(home)) >= 2  # Dovecot (and its children) and the front
        for name in ("smtp", "imap"):
            with socket.create_connection(("127.0.0.1", node.gateway_ports[name])) as c:
                c.settimeout(30)
                assert c.recv(100)[:4] in (b"220 ", b"* OK")
    finally:
        await node.stop()
    await eventually(lambda: not processes_of(home), "no Dovecot and no SMTP front left")
