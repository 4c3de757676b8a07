"""Fixtures for driving real Debian mail clients against a real gateway on 127.0.0.1.

A missing client program is a failure, not a skip: ``make test`` installs them all
(scripts/system-deps.sh), so a missing one means the environment is not what CI runs.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import struct
import subprocess
import termios
import time
from collections.abc import Iterator, Sequence

import pytest

from tests.integration.test_imap_gateway import Gateway


def require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(
            f"{program} is not installed (Debian package {package}). Run `make test`, which "
            "installs the mail clients the test suite drives (scripts/system-deps.sh test).",
            pytrace=False,
        )
    return path


@pytest.fixture
def gateway() -> Iterator[Gateway]:
    """The node's private Dovecot (IMAP, mail filed through LMTP) in its own /tmp folder."""
    gw = Gateway()
    yield gw
    gw.stop()


def run_in_terminal(argv: Sequence[str], *, env: dict[str, str], timeout: float) -> str:
    """Run a full-screen program on a pseudo-terminal until it exits; return its screen output.

    neomutt has no non-interactive read mode, so it gets a terminal and its keystrokes from
    ``push`` commands on the command line.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
    proc = subprocess.Popen(
        list(argv), stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True
    )
    os.close(slave)
    screen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # the terminal closed: the program has exited
                    break
                if not chunk:
                    break
                screen += chunk
            elif proc.poll() is not None:
                break
        try:  # the terminal closes a moment before the process is gone
            proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"{argv[0]} did not finish in {timeout} s; its screen:\n{_text(screen)}")
    finally:
        os.close(master)
    if proc.returncode != 0:
        pytest.fail(f"{argv[0]} exited with {proc.returncode}; its screen:\n{_text(screen)}")
    return _text(screen)


def _text(screen: bytes) -> str:
    return screen.decode("utf-8", "replace")[-3000:]
