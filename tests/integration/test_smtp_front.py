"""The SMTP front process (gateway/smtpfront.py): the submission protocol in a child process.

A real front (``python -m gateway.smtpfront``) serves sockets bound by this test process,
which plays the node: its own account store and a recording ``submit``.  Killing the front
in the middle of DATA loses nothing that was acknowledged and the node starts a new one; a
node killed with SIGKILL leaves no front behind holding the port; frames the node cannot read
get an error answer, and a stream it cannot trust closes the pair, never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.smtp import LocalBackend
from gateway.smtpfront import (
    DATA_DONE,
    ERROR,
    IN_DATA,
    LOGGED_IN,
    LOGIN,
    REPLY,
    SUBMIT,
    FrameError,
    SMTPFront,
    encode_frame,
    parse_frame,
    read_frame,
    serve_pair,
    start_front,
)
from gateway.throttle import LoginThrottle
from gateway.tls import ensure_tls
from onionpost.base.aio import foreground
from onionpost.base.config import GatewayConfig
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.store.accounts import AccountStore
from tests.accounts import account_store

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery staple"
HOME = ed25519_public(SeededRandom(b"smtp-home")(32))
ALICE = Address.for_key("alice", HOME)
BOB = Address.for_key("bob", ed25519_public(SeededRandom(b"smtp-away")(32)))
#: Generous bounds for "eventually" on a loaded 2-core machine; never what a test measures.
PATIENCE = 120.0


class Recorder:
    """The node's ``submit_async``: records what it was given; ``gate`` holds a commit open
    (on the node's loop, as the group commit's caller waits)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Address], bytes]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def __call__(self, user: str, recipients: list[Address], message: bytes) -> int:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.calls.append((user, recipients, message))
        return len(self.calls)


def _message(msg_id: str) -> bytes:
    return (
        f"From: <{ALICE}>\r\nTo: <{BOB}>\r\nSubject: front\r\nMessage-ID: {msg_id}\r\n\r\n"
        "Hello.\r\n"
    ).encode()


@pytest.fixture
def accounts() -> Iterator[AccountStore]:
    with account_store(("alice", str(ALICE), PASSWORD)) as store:
        yield store


@pytest.fixture
async def front(
    accounts: AccountStore, tmp_path: Path
) -> AsyncIterator[tuple[SMTPFront, Recorder]]:
    ensure_tls(tmp_path / "tls")
    recorder = Recorder()
    running = await start_front(
        GatewayConfig(smtp_port=0),
        submit=recorder,
        accounts=accounts,
        tls_dir=tmp_path / "tls",
        auth_failure_delay=0.0,
    )
    yield running, recorder
    await running.close()


def _send(port: int, msg_id: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=PATIENCE) as client:
        client.login("alice", PASSWORD)
        client.sendmail(str(ALICE), [str(BOB)], _message(msg_id))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too (its parent, the killed "node", is gone or not reaping).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def _eventually(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"not within {PATIENCE:.0f} s: {what}"
        await asyncio.sleep(0.05)


# -- a real front ---------------------------------------------------------------------------


async def test_the_front_serves_logins_and_submissions_from_the_node(
    front: tuple[SMTPFront, Recorder],
) -> None:
    gw, recorder = front
    assert gw.pid is not None and gw.pid != os.getpid()
    await asyncio.to_thread(_send, gw.port, "<one@test>")
    assert len(recorder.calls) == 1
    user, recipients, message = recorder.calls[0]
    assert (user, recipients) == ("alice", [BOB])
    assert b"Message-ID: <one@test>" in message and b"Date: " in message  # added by the front

    def refused() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=PATIENCE) as client:
            try:
                client.login("alice", "wrong")
            except smtplib.SMTPAuthenticationError as exc:
                return exc.smtp_code, exc.smtp_error
        raise AssertionError("a wrong password logged in")

    # A message of several MiB crosses the pair in one frame (the reader resumes as it goes).
    big = _message("<big@test>") + b"x" * 76 + b"\r\n"
    big += b"y" * 998 * 1024 * 3 + b"\r\n"

    def send_big() -> None:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=PATIENCE) as client:
            client.login("alice", PASSWORD)
            client.sendmail(str(ALICE), [str(BOB)], big)

    await asyncio.to_thread(send_big)
    assert recorder.calls[-1][2].endswith(big)
    del recorder.calls[-1]

    code, text = await asyncio.to_thread(refused)
    assert code == 535 and b"password is wrong" in text

    def not_own() -> smtplib.SMTPDataError:
        with smtplib.SMTP("127.0.0.1", gw.port, timeout=PATIENCE) as client:
            client.login("alice", PASSWORD)
            forged = _message("<two@test>").replace(str(ALICE).encode(), str(BOB).encode(), 1)
            with pytest.raises(smtplib.SMTPDataError) as caught:
                client.sendmail(str(ALICE), [str(BOB)], forged)
            return caught.value

    assert (await asyncio.to_thread(not_own)).smtp_code == 550
    assert len(recorder.calls) == 1


async def test_killing_the_front_mid_data_loses_nothing_acknowledged_and_it_comes_back(
    front: tuple[SMTPFront, Recorder],
) -> None:
    gw, recorder = front
    acked = []
    for i in range(5):
        await asyncio.to_thread(_send, gw.port, f"<before.{i}@test>")
        acked.append(f"<before.{i}@test>")
    first = gw.pid
    assert first is not None

    # A client in the middle of DATA: half a message sent, then the front is killed.
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    plain = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    for line in [
        b"",
        b"EHLO client.example\r\n",
        f"AUTH PLAIN {plain}\r\n".encode(),
        f"MAIL FROM:<{ALICE}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
        b"DATA\r\n",
    ]:
        if line:
            writer.write(line)
        while (reply := await reader.readline())[3:4] == b"-":
            pass
        assert reply[:1] in (b"2", b"3"), reply
    writer.write(_message("<cut@test>")[:40])
    await writer.drain()
    os.kill(first, signal.SIGKILL)
    try:  # the connection ends without a 250 (reset: the front had unread input)
        rest = await reader.read()
    except ConnectionResetError:
        rest = b""
    assert b"250" not in rest
    writer.close()

    # A kill while the node commits: the commit completes, the client hears nothing.
    recorder.gate = asyncio.Event()
    recorder.entered.clear()
    await _eventually(lambda: gw.restarts == 1 and gw.pid, "the node restarts the front")
    second = gw.pid
    assert second is not None
    sending = asyncio.create_task(asyncio.to_thread(_send, gw.port, "<in.commit@test>"))
    await recorder.entered.wait()
    os.kill(second, signal.SIGKILL)
    with pytest.raises(smtplib.SMTPException):
        await sending
    recorder.gate.set()
    recorder.gate = None
    await _eventually(lambda: len(recorder.calls) == 6, "the commit under way completes")

    await _eventually(lambda: gw.restarts == 2 and gw.pid, "a third front")
    assert gw.pid not in (first, second)
    await asyncio.to_thread(_send, gw.port, "<after@test>")
    acked.append("<after@test>")
    stored = [m for _u, _r, m in recorder.calls]
    for msg_id in acked:
        assert sum(f"Message-ID: {msg_id}".encode() in m for m in stored) == 1, msg_id
    assert not any(b"<cut@test>" in m for m in stored)
    assert not _alive(first) and not _alive(second)


_NODE = """
import asyncio, sys
from pathlib import Path
from gateway.smtpfront import start_front
from onionpost.base.aio import foreground
from onionpost.base.config import GatewayConfig
from onionpost.store.accounts import AccountStore
from onionpost.store.db import Database

async def main() -> None:
    db = Database(":memory:", ["accounts"])
    front = await start_front(
        GatewayConfig(smtp_port=0), submit=lambda u, r, m: 1,  # never called
        accounts=AccountStore(db), tls_dir=Path(sys.argv[1]),
    )
    print(front.pid, front.port, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_a_node_killed_with_sigkill_leaves_no_front_holding_the_port(tmp_path: Path) -> None:
    ensure_tls(tmp_path / "tls")
    node = subprocess.Popen(
        [sys.executable, "-c", _NODE, str(tmp_path / "tls")],
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert node.stdout is not None
        line = await asyncio.to_thread(node.stdout.readline)
        pid, port = (int(x) for x in line.split())
        assert _alive(pid)
        node.send_signal(signal.SIGKILL)
        node.wait()
        await _eventually(lambda: not _alive(pid), "the front exits after its node's SIGKILL")
        with socket.socket() as probe:  # nobody holds the port any more
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
            probe.listen()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
        if node.stdout is not None:
            node.stdout.close()


# -- the pair ------------------------------------------------------------------------------


def test_frame_test_vector_and_strict_parsing() -> None:
    """The vector in docs/protocol.md."""
    frame = encode_frame(SUBMIT, 7, [b"alice", b"Hi\r\n", b"bob@x.onion"])
    assert frame.hex() == (
        "00000025530000000700000005616c6963650000000448690d0a0000000b626f6240782e6f6e696f6e"
    )
    assert parse_frame(frame[4:], frozenset({SUBMIT})) == (
        SUBMIT,
        7,
        [b"alice", b"Hi\r\n", b"bob@x.onion"],
    )
    for payload, request in [
        (b"S\0\0", None),  # shorter than its header
        (b"Z\0\0\0\x01", 1),  # unknown kind
        (b"S\0\0\0\x02\0\0", 2),  # a field's length cut off
        (b"S\0\0\0\x03\0\0\0\x09abc", 3),  # a field past the end
    ]:
        with pytest.raises(FrameError) as caught:
            parse_frame(payload, frozenset({SUBMIT}))
        assert caught.value.request == request


async def test_garbage_on_the_pair_gets_an_error_answer_and_never_a_crash(
    accounts: AccountStore,
) -> None:
    recorder = Recorder()
    backend = LocalBackend(submit=recorder, accounts=accounts, throttle=LoginThrottle(base=0.0))
    ours, theirs = socket.socketpair()
    node_reader, node_writer = await asyncio.open_unix_connection(sock=ours)
    serving = asyncio.create_task(serve_pair(node_reader, node_writer, backend, 1 << 20))
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    answers = frozenset({ERROR, LOGGED_IN, REPLY})

    async def ask(raw: bytes) -> tuple[int, int, list[bytes]]:
        writer.write(raw)
        await writer.drain()
        return await read_frame(reader, 1 << 16, answers)

    # Readable frames the node cannot take: an error answer each, and the pair goes on.
    bad = [
        b"\0\0\0\x05Z\0\0\0\x01",  # an unknown kind
        encode_frame(SUBMIT, 2, [b"alice"]),  # too few fields
        b"\0\0\0\x0aS\0\0\0\x03\0\0\0\x09a",  # a field past the end
        encode_frame(LOGIN, 4, [b"\xff\xfe", b"x", b"127.0.0.1"]),  # not UTF-8
        encode_frame(SUBMIT, 5, [b"alice", _message("<x@test>"), b"not an address"]),
    ]
    for request, raw in enumerate(bad, start=1):
        kind, answered, fields = await ask(raw)
        if request == 5:  # a refusal in SMTP words, from the node's own checks
            assert kind == REPLY and fields[0].startswith(b"5"), fields
        else:
            assert (kind, answered) == (ERROR, request), fields
    assert recorder.calls == []
    kind, answered, fields = await ask(encode_frame(LOGIN, 9, [b"alice", PASSWORD.encode(), b""]))
    assert (kind, answered, fields) == (LOGGED_IN, 9, [b"alice", str(ALICE).encode()])
    kind, answered, fields = await ask(
        encode_frame(SUBMIT, 10, [b"alice", _message("<ok@test>"), str(BOB).encode()])
    )
    assert (kind, answered) == (REPLY, 10) and fields[0].startswith(b"250 "), fields

    # A session in DATA holds the node's background work back until it is done; a stray
    # "done" does nothing, and a front that goes away in DATA releases it.
    async def tell(kind: int) -> None:
        writer.write(encode_frame(kind, 0, []))
        await writer.drain()
        # An answered request after it: the node has read the frame before answering.
        await ask(encode_frame(LOGIN, 11, [b"nobody", b"x", b""]))

    assert not foreground.is_busy
    await tell(IN_DATA)
    assert foreground.is_busy
    await tell(DATA_DONE)
    assert not foreground.is_busy
    await tell(DATA_DONE)
    await tell(IN_DATA)
    assert foreground.is_busy

    # A length out of bounds: the stream cannot be trusted, so the node closes the pair.
    writer.write(b"\xff\xff\xff\xff" + b"x" * 100)
    await writer.drain()
    assert await reader.read() == b""
    await serving  # ended on its own, without an exception
    assert not foreground.is_busy
    writer.close()


async def test_a_front_that_cannot_start_is_tried_again(
    front: tuple[SMTPFront, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    gw, _recorder = front
    first = gw.pid
    assert first is not None
    good = gw._config["tls_dir"]
    gw._config["tls_dir"] = "/proc/no-such-directory"  # the next front fails before its hello
    os.kill(first, signal.SIGKILL)
    await _eventually(
        lambda: "SMTP front process did not start" in caplog.text, "a failed start is logged"
    )
    assert gw.restarts == 0
    gw._config["tls_dir"] = good
    await _eventually(lambda: gw.restarts == 1 and gw.pid, "the node tries again")
    await asyncio.to_thread(_send, gw.port, "<again@test>")
