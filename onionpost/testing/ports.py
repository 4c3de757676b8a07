"""Loopback ports for tests and benches that configure a program which binds them later.

A port from ``bind((host, 0))`` comes from the kernel's ephemeral range, the range every
outgoing connection's local port is taken from too.  Between that check and the program's
own bind (a node's SMTP front, its Dovecot, tor), any connection on the machine may take it
(a test's client, tor's circuits, another test run beside this one), and the program fails
with "Address already in use": Dovecot did, in the crash test, while a second Debian root
ran its tests on the same machine.  These ports come from below that range, where only
programs that pick a port themselves bind, and a port is not handed out twice by one
process, so the ports of one set-up do not collide with each other before they are bound.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 20_000
_handed: set[int] = set()
_rng = random.Random()  # noqa: S311 - a port choice, not a secret


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ephemeral_low() -> int:
    """The lowest port the kernel hands out on its own (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def start_range(span: int = 0) -> range:
    """Where a port (or a block of ``span`` more) may start: from 20000 to below the
    ephemeral range, when the range leaves room (else up to 60000)."""
    low = ephemeral_low()
    return range(_LOWEST, low - span if low - span > _LOWEST + 1_000 else 60_000 - span)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, below the ephemeral range when the range leaves room."""
    starts = start_range()
    for _ in range(500):
        port = _rng.choice(starts)
        if port not in _handed and port_is_free(port, host):
            _handed.add(port)
            return port
    raise OSError(f"No free port found on {host} between {starts.start} and {starts.stop}.")
