"""The SMTP submission gateway, driven by Python's smtplib and raw sockets over loopback.

Each test runs a real server (port 0) in the test's event loop; blocking clients run in a
worker thread.  ``Recorder`` stands in for ``Submissions.submit`` where a test needs to
control it; ``test_real_submissions_*`` use the real one on a real device.db.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import smtplib
import socket
import ssl
import threading
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from gateway.smtp import SMTPGateway, add_missing_headers, start_smtp
from gateway.throttle import LoginThrottle
from gateway.tls import ca_path, server_context
from onionpost.base.clock import SystemClock
from onionpost.base.config import DeliveryConfig, GatewayConfig
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import (
    GatewayError,
    MessageTooLarge,
    QuotaExceeded,
    StoreError,
    UnknownLocalUser,
)
from onionpost.device.submission import Submissions
from onionpost.net.transport import DirectDialer
from onionpost.store.accounts import AccountStore
from onionpost.store.db import Database
from onionpost.store.submissions import SubmissionStore
from onionpost.testing.harness import DeviceNode, InboxNode
from tests.accounts import CHEAP, account_store

PASSWORD = "correct horse battery staple"
HOME = ed25519_public(SeededRandom(b"smtp-home")(32))
ALICE = Address.for_key("alice", HOME)
CAROL = Address.for_key("carol", HOME)  # another user of the same inbox
BOB = Address.for_key("bob", ed25519_public(SeededRandom(b"smtp-away")(32)))
MiB = 1024 * 1024


def message(
    sender: Address = ALICE,
    to: Address = BOB,
    *,
    extra: str = "Message-ID: <fixed@example.onion>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n",
    body: str = "Hello.\r\n",
) -> bytes:
    head = f"From: Alice <{sender}>\r\nTo: <{to}>\r\nSubject: test\r\n{extra}"
    return (head + "\r\n" + body).encode()


@dataclass
class Recorder:
    """A stand-in for Submissions.submit that records calls and can fail on demand."""

    calls: list[tuple[str, list[Address], bytes]] = field(default_factory=list)
    returned_at: list[float] = field(default_factory=list)
    fail: Exception | None = None

    def __call__(self, user: str, recipients: list[Address], msg: bytes) -> int:
        if self.fail is not None:
            raise self.fail
        time.sleep(0.05)  # a commit takes a moment; 250 must still come after it
        self.calls.append((user, list(recipients), msg))
        self.returned_at.append(time.monotonic())
        return len(self.calls)


@pytest.fixture
def accounts() -> Iterator[AccountStore]:
    with account_store(
        ("alice", str(ALICE), PASSWORD), ("carol", str(CAROL), "carol's password")
    ) as store:
        yield store


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    return tmp_path / "tls"


@pytest.fixture
def cafile(tls_dir: Path) -> str:
    return str(ca_path(tls_dir))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


Start = Callable[..., Awaitable[SMTPGateway]]


@pytest.fixture
async def start(accounts: AccountStore, tls_dir: Path, recorder: Recorder) -> AsyncIterator[Start]:
    """Start a gateway; keyword arguments override GatewayConfig fields and start_smtp's."""
    running: list[SMTPGateway] = []

    async def _start(**kw: Any) -> SMTPGateway:
        cfg_fields = {k: kw.pop(k) for k in ("max_message_bytes", "require_tls") if k in kw}
        cfg = GatewayConfig(smtp_port=0, **cfg_fields)
        kw.setdefault("submit", recorder)
        kw.setdefault("accounts", accounts)
        kw.setdefault("tls", server_context(tls_dir))
        kw.setdefault("auth_failure_delay", 0.0)
        gw = await start_smtp(cfg, **kw)
        running.append(gw)
        return gw

    yield _start
    for gw in running:
        await gw.close()


@pytest.fixture
async def gw(start: Start) -> SMTPGateway:
    return await start()


def connect(gw: SMTPGateway) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gw.port, timeout=20)
    client.ehlo("client.example")
    return client


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- raw-socket helpers, for what smtplib will not send ------------------------------------


async def read_reply(reader: asyncio.StreamReader) -> list[bytes]:
    """All lines of one (possibly multi-line) reply."""
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), 20)
        if not line:
            raise ConnectionError("closed")
        lines.append(line.rstrip(b"\r\n"))
        if line[3:4] != b"-":
            return lines


async def open_raw(gw: SMTPGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    await read_reply(reader)
    return reader, writer


async def converse(gw: SMTPGateway, data: bytes) -> list[bytes]:
    """Send everything in one write; return every reply line until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(data)
    await writer.drain()
    out = []
    while line := await asyncio.wait_for(reader.readline(), 20):
        out.append(line.rstrip(b"\r\n"))
    writer.close()
    await writer.wait_closed()
    return out


# --- greeting, EHLO, AUTH ------------------------------------------------------------------


async def test_greeting_and_ehlo_advertise_auth_starttls_size_and_hide_the_host(
    gw: SMTPGateway,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    greeting = (await read_reply(reader))[0].decode()
    writer.write(b"EHLO client.example\r\n")
    ehlo = [line.decode() for line in await read_reply(reader)]
    writer.close()
    await writer.wait_closed()

    assert greeting == "220 onionpost ESMTP"
    assert ehlo[0] == "250-onionpost"
    keywords = {line[4:] for line in ehlo[1:]}
    assert {"STARTTLS", "AUTH LOGIN PLAIN", "SIZE 52428800", "ENHANCEDSTATUSCODES"} <= keywords
    everything = " ".join([greeting, *ehlo])
    for name in {socket.gethostname(), socket.getfqdn()} - {"onionpost", "localhost"}:
        assert name not in everything
    assert "Python" not in everything and "aiosmtpd" not in everything


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_login_with_each_mechanism(gw: SMTPGateway, mechanism: str) -> None:
    def run() -> tuple[int, bytes]:
        with connect(gw) as client:
            client.user, client.password = "alice", PASSWORD
            auth = client.auth_plain if mechanism == "PLAIN" else client.auth_login
            return client.auth(mechanism, auth)

    assert await in_thread(run) == (235, b"2.7.0 Authentication successful.")


async def test_login_with_the_whole_address(gw: SMTPGateway) -> None:
    def run() -> tuple[int, bytes]:
        with connect(gw) as client:
            return client.login(str(ALICE), PASSWORD)

    assert (await in_thread(run))[0] == 235


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("mallory", PASSWORD)])
async def test_wrong_password_and_unknown_user_read_the_same(
    gw: SMTPGateway, user: str, password: str
) -> None:
    def run() -> smtplib.SMTPAuthenticationError:
        with connect(gw) as client, pytest.raises(smtplib.SMTPAuthenticationError) as err:
            client.login(user, password)
        return err.value

    err = await in_thread(run)
    assert err.smtp_code == 535
    assert err.smtp_error.startswith(b"5.7.8 The user name or password is wrong.")


async def test_failed_logins_are_slowed_down(start: Start) -> None:
    gw = await start(auth_failure_delay=0.3)

    def run() -> float:
        with connect(gw) as client:
            began = time.monotonic()
            code, _ = client.docmd("AUTH", "PLAIN " + plain("alice", "nope"))
            assert code == 535
            return time.monotonic() - began

    assert await in_thread(run) >= 0.3


async def test_guessing_backs_off_per_account_and_the_owner_still_gets_in(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    throttle = LoginThrottle(base=0.1, cap=0.8)
    gw = await start(throttle=throttle)
    caplog.set_level(logging.INFO)

    def guess(password: str) -> tuple[int, float]:
        with connect(gw) as client:
            began = time.monotonic()
            code, _ = client.docmd("AUTH", "PLAIN " + plain("alice", password))
            return code, time.monotonic() - began

    # one guess per connection, so the per-connection AUTH budget does not come into it
    took = [await in_thread(lambda i=i: guess(f"guess {i}")) for i in range(5)]
    assert [code for code, _ in took] == [535] * 5
    # each failure is answered only after the doubling delay (0.1, 0.2, 0.4, 0.8, 0.8)
    for (_, seconds), at_least in zip(took, [0.1, 0.2, 0.4, 0.8, 0.8], strict=True):
        assert seconds >= at_least * 0.9
    failures = [r for r in caplog.records if "failed login" in r.getMessage()]
    assert len(failures) == 5 and all(r.name == "gateway.smtp" for r in failures)
    assert all("'alice'" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in failures)
    assert "guess" not in caplog.text
    # a flood from elsewhere against alice: the owner's wait stays capped
    # (at once: each failure is counted before its pause, so the pauses overlap)
    await asyncio.gather(*(throttle.failed("smtp", "alice", "192.0.2.7") for _ in range(50)))
    assert throttle.wait_for("alice", "127.0.0.1") <= 0.8
    code, _ = await in_thread(lambda: guess(PASSWORD))
    assert code == 235  # the right password works after the delay
    assert throttle.failures("alice", "127.0.0.1") == 0  # and clears the count


async def test_unknown_users_count_against_the_client_only(start: Start) -> None:
    throttle = LoginThrottle(base=0.05, cap=0.1)
    gw = await start(throttle=throttle)

    def run() -> None:
        for i in range(3):
            with connect(gw) as client:
                assert client.docmd("AUTH", "PLAIN " + plain(f"nobody{i}", "x"))[0] == 535

    await in_thread(run)
    assert throttle.failures(None, "127.0.0.1") == 3
    assert throttle.failures("nobody0", "192.0.2.1") == 0


async def test_password_guessing_is_cut_off_per_connection(gw: SMTPGateway) -> None:
    guesses = b"".join(
        b"AUTH PLAIN " + plain("alice", f"guess{i}").encode() + b"\r\n" for i in range(8)
    )
    replies = await converse(gw, b"EHLO x\r\n" + guesses)
    codes = [r[:3] for r in replies if not r.startswith(b"250")]
    assert codes[1:6] == [b"535"] * 5
    assert replies[-1].startswith(b"421 4.7.0 Too many AUTH commands")


async def test_mail_before_auth_is_refused(gw: SMTPGateway) -> None:
    def run() -> tuple[int, bytes]:
        with connect(gw) as client:
            return client.mail(str(ALICE))

    code, text = await in_thread(run)
    assert (code, text[:6]) == (530, b"5.7.0 ")
    assert b"log in" in text


async def test_auth_after_helo_needs_ehlo(gw: SMTPGateway) -> None:
    replies = await converse(
        gw, b"HELO x\r\nAUTH PLAIN " + plain("alice", PASSWORD).encode() + b"\r\nQUIT\r\n"
    )
    assert replies[2] == b"503 5.5.1 AUTH needs EHLO, not HELO."


# --- TLS -----------------------------------------------------------------------------------


async def test_starttls_with_the_local_ca_then_send(
    gw: SMTPGateway, recorder: Recorder, cafile: str
) -> None:
    def run() -> dict[str, Any]:
        with connect(gw) as client:
            client.starttls(context=ssl.create_default_context(cafile=cafile))
            client.ehlo("client.example")
            assert not client.has_extn("starttls")
            code, text = client.docmd("STARTTLS")
            assert (code, text) == (503, b"5.5.1 TLS is already active on this connection.")
            client.login("alice", PASSWORD)
            return client.sendmail(str(ALICE), [str(BOB)], message())

    assert await in_thread(run) == {}
    assert recorder.calls[0][:2] == ("alice", [BOB])


async def test_an_untrusting_client_cannot_complete_starttls_and_the_gateway_stays_up(
    gw: SMTPGateway,
) -> None:
    def run() -> None:
        with connect(gw) as client, pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=ssl.create_default_context())
        with connect(gw) as client:
            assert client.noop()[0] == 250

    await in_thread(run)


async def test_require_tls_refuses_auth_before_starttls(start: Start, cafile: str) -> None:
    gw = await start(require_tls=True)

    def run() -> None:
        with connect(gw) as client:
            assert not client.has_extn("auth")
            code, text = client.docmd("AUTH", "PLAIN " + plain("alice", PASSWORD))
            assert code == 538
            assert text.startswith(b"5.7.11 Encryption required")
            client.starttls(context=ssl.create_default_context(cafile=cafile))
            client.ehlo("client.example")
            assert client.has_extn("auth")
            assert client.login("alice", PASSWORD)[0] == 235

    await in_thread(run)


# --- envelope ------------------------------------------------------------------------------


def sender_refusal(gw: SMTPGateway, mail_from: str, msg: bytes, rcpt: str = str(BOB)) -> Any:
    with connect(gw) as client:
        client.login("alice", PASSWORD)
        with pytest.raises(smtplib.SMTPException) as err:
            client.sendmail(mail_from, [rcpt], msg)
        return err.value


async def test_mail_from_must_be_the_own_address(gw: SMTPGateway, recorder: Recorder) -> None:
    err = await in_thread(lambda: sender_refusal(gw, str(CAROL), message(sender=CAROL)))
    assert isinstance(err, smtplib.SMTPSenderRefused)
    assert err.smtp_code == 550
    assert err.smtp_error.startswith(b"5.7.1 The sender (MAIL FROM) must be your own address")
    assert str(ALICE).encode() in err.smtp_error
    assert recorder.calls == []


async def test_empty_mail_from_is_refused(gw: SMTPGateway) -> None:
    auth = b"AUTH PLAIN " + plain("alice", PASSWORD).encode() + b"\r\n"
    replies = await converse(gw, b"EHLO x\r\n" + auth + b"MAIL FROM:<>\r\nQUIT\r\n")
    assert replies[-2].startswith(b"550 5.7.1 An empty sender (MAIL FROM:<>) is only for bounces")


async def test_from_header_must_be_the_own_address(gw: SMTPGateway, recorder: Recorder) -> None:
    err = await in_thread(lambda: sender_refusal(gw, str(ALICE), message(sender=CAROL)))
    assert isinstance(err, smtplib.SMTPDataError)
    assert err.smtp_code == 550
    assert err.smtp_error.startswith(b"5.7.1 The From: header must be your own address")
    assert recorder.calls == []


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (b"To: x\r\nSubject: no author\r\n", b"5.7.1 The message has no From: header"),
        (
            f"From: {ALICE}, {CAROL}\r\n".encode(),
            f"5.7.1 The From: header must be your own address, {ALICE}; {CAROL} is not".encode(),
        ),
        (
            f"From: {ALICE}\r\nSender: {CAROL}\r\n".encode(),
            b"5.7.1 The Sender: header must be your own address",
        ),
    ],
)
async def test_every_author_header_is_checked(
    gw: SMTPGateway, headers: bytes, expected: bytes
) -> None:
    err = await in_thread(lambda: sender_refusal(gw, str(ALICE), headers + b"\r\nbody\r\n"))
    assert err.smtp_code == 550
    assert err.smtp_error.startswith(expected)


@pytest.mark.parametrize(
    ("rcpt", "sentence"),
    [
        ("bob@example.com", b"is not an onionpost address"),
        (
            str(BOB).replace(BOB.onion[10], "a" if BOB.onion[10] != "a" else "b", 1),
            b"wrong checksum",
        ),
        ("bob@" + "a" * 16 + ".onion", b"is not a v3 onion address"),
        ("no-at-sign", b"needs exactly one '@'"),
    ],
)
async def test_recipients_must_be_onionpost_addresses(
    gw: SMTPGateway, rcpt: str, sentence: bytes
) -> None:
    def run() -> tuple[int, bytes]:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            client.mail(str(ALICE))
            return client.rcpt(rcpt)

    code, text = await in_thread(run)
    assert code == 550
    assert text.startswith(b"5.1.3 ")
    assert sentence in text


async def test_unreadable_recipient_gets_the_same_code(gw: SMTPGateway) -> None:
    auth = b"AUTH PLAIN " + plain("alice", PASSWORD).encode() + b"\r\n"
    mail = f"MAIL FROM:<{ALICE}>\r\n".encode()
    replies = await converse(gw, b"EHLO x\r\n" + auth + mail + b"RCPT TO:<a@b@c>\r\nQUIT\r\n")
    assert replies[-2].startswith(b"550 5.1.3 That address cannot be read")


async def test_several_recipients_bcc_and_same_inbox_users(
    gw: SMTPGateway, recorder: Recorder
) -> None:
    msg = message(to=BOB)  # CAROL and ALICE herself are Bcc: in the envelope only

    def run() -> dict[str, Any]:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            return client.sendmail(
                str(ALICE), [str(BOB), str(CAROL), str(ALICE), str(BOB).upper()], msg
            )

    assert await in_thread(run) == {}
    user, recipients, stored = recorder.calls[0]
    assert user == "alice"
    assert recipients == [BOB, CAROL, ALICE]  # duplicates folded, case-insensitively
    assert stored == msg
    assert b"Bcc" not in stored and str(CAROL).encode() not in stored


async def test_too_many_recipients_get_452(start: Start) -> None:
    gw = await start(max_recipients=2)

    def run() -> list[tuple[int, bytes]]:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            client.mail(str(ALICE))
            return [client.rcpt(str(a)) for a in (BOB, CAROL, ALICE)]

    codes = await in_thread(run)
    assert [c for c, _ in codes] == [250, 250, 452]
    assert codes[2][1].startswith(b"4.5.3 Too many recipients: at most 2")


# --- size ------------------------------------------------------------------------------------


async def test_size_parameter_over_the_limit_is_refused_at_mail_from(start: Start) -> None:
    gw = await start(max_message_bytes=MiB)

    def run() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with connect(gw) as client:
            assert client.esmtp_features["size"] == str(MiB)
            client.login("alice", PASSWORD)
            over = client.mail(str(ALICE), [f"SIZE={MiB + 1}"])
            client.rset()
            return over, client.mail(str(ALICE), [f"SIZE={MiB}"])

    over, exact = await in_thread(run)
    assert over[0] == 552
    assert over[1].startswith(b"5.3.4 The message is 1048577 bytes; this gateway accepts at most")
    assert exact[0] == 250


async def send_data_raw(gw: SMTPGateway, chunks: Iterator[bytes]) -> list[bytes]:
    """Log in, open DATA, stream ``chunks`` then the final dot; return the DATA reply."""
    reader, writer = await open_raw(gw)
    for command in (
        b"EHLO x",
        b"AUTH PLAIN " + plain("alice", PASSWORD).encode(),
        f"MAIL FROM:<{ALICE}>".encode(),
        f"RCPT TO:<{BOB}>".encode(),
        b"DATA",
    ):
        writer.write(command + b"\r\n")
        await read_reply(reader)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
    writer.write(b"\r\n.\r\nQUIT\r\n")
    reply = await read_reply(reader)
    writer.close()
    await writer.wait_closed()
    return reply


def lines_of(total: int, line: bytes = b"x" * 998 + b"\r\n") -> Iterator[bytes]:
    block = line * (MiB // len(line))
    header = message(body="")
    yield header
    sent = len(header)
    while sent < total:
        yield block
        sent += len(block)


def one_long_line(total: int) -> Iterator[bytes]:
    yield message(body="")
    block = b"y" * MiB
    for _ in range(total // MiB):
        yield block


async def test_data_over_the_limit_is_refused_after_the_dot_and_the_gateway_stays_up(
    start: Start, recorder: Recorder
) -> None:
    gw = await start(max_message_bytes=MiB)
    reply = await send_data_raw(gw, lines_of(60 * MiB))
    assert reply[0].startswith(b"552 5.3.4 The message is larger than this gateway's limit")
    assert recorder.calls == []

    def still_up() -> dict[str, Any]:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            return client.sendmail(str(ALICE), [str(BOB)], message())

    assert await in_thread(still_up) == {}


@pytest.mark.parametrize("shape", [lines_of, one_long_line], ids=["lines", "one-line"])
async def test_oversized_data_does_not_fill_memory(
    start: Start, shape: Callable[[int], Iterator[bytes]]
) -> None:
    """100 MiB against a 1 MiB limit: the server keeps at most about the limit in memory."""
    gw = await start(max_message_bytes=MiB)
    tracemalloc.start()
    try:
        reply = await send_data_raw(gw, shape(100 * MiB))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply[0].startswith(b"552 5.3.4")
    assert peak < 8 * MiB, f"peak {peak / MiB:.1f} MiB"


async def test_a_long_line_within_the_limit_is_accepted_whole(
    start: Start, recorder: Recorder
) -> None:
    gw = await start(max_message_bytes=MiB)
    body = b"z" * (300 * 1024)
    reply = await send_data_raw(gw, iter([message(body=""), body]))
    assert reply[0].startswith(b"250 2.0.0 Ok: queued as")
    assert recorder.calls[0][2] == message(body="") + body + b"\r\n"


# --- DATA content ----------------------------------------------------------------------------


async def test_missing_message_id_and_date_are_added_and_nothing_else_changes(
    gw: SMTPGateway, recorder: Recorder
) -> None:
    bare = message(extra="")

    def run() -> None:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            client.sendmail(str(ALICE), [str(BOB)], bare)
            client.sendmail(str(ALICE), [str(BOB)], message())

    await in_thread(run)
    added, kept = recorder.calls[0][2], recorder.calls[1][2]
    assert kept == message()
    assert added.endswith(bare)
    parsed = message_from_bytes(added)
    assert parsed["Message-ID"].endswith(f"@{ALICE.domain}>")
    assert parsed["Date"].endswith("-0000")


def test_add_missing_headers_only_adds() -> None:
    with_both = message()
    assert add_missing_headers(with_both, ALICE, now=0, token="t") == with_both
    only_date = message(extra="Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n")
    out = add_missing_headers(only_date, ALICE, now=0, token="t")
    assert out == f"Message-ID: <t@{ALICE.domain}>\r\n".encode() + only_date
    folded = message(
        extra="Message-Id:\r\n <folded@x.onion>\r\ndate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    )
    assert add_missing_headers(folded, ALICE, now=0, token="t") == folded


async def test_malformed_mime_is_the_clients_business(gw: SMTPGateway, recorder: Recorder) -> None:
    weird = (
        message(
            extra=(
                "Message-ID: <m@x.onion>\r\nDate: yesterday-ish\r\n"
                'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="never-closed"\r\n'
                "Content-Transfer-Encoding: base64\r\nX-Junk \x01 no colon\r\n"
            ),
            body="--never-closed\r\nnot base64 at all !!!\r\n.leading dot\r\nbare\nLF\r\n",
        )
        + b"\xe9\xff eight-bit bytes\r\n"
    )

    def run() -> dict[str, Any]:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            return client.sendmail(str(ALICE), [str(BOB)], weird, mail_options=["BODY=8BITMIME"])

    assert await in_thread(run) == {}
    assert recorder.calls[0][2] == weird


async def test_250_only_after_submit_returned(gw: SMTPGateway, recorder: Recorder) -> None:
    def run() -> float:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            client.mail(str(ALICE))
            client.rcpt(str(BOB))
            code, text = client.data(message())
            assert code == 250
            assert text == b"2.0.0 Ok: queued as 1"
            return time.monotonic()

    answered = await in_thread(run)
    assert recorder.returned_at[0] <= answered


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            StoreError("The database is busy; try again in a moment."),
            b"451 4.3.0 The database is busy",
        ),
        (QuotaExceeded(), b"452 4.2.2 The mailbox is full"),
        (
            UnknownLocalUser("There is no onionpost user 'alice' on this node."),
            b"550 5.1.1 There is no",
        ),
        (MessageTooLarge("The message is 9 bytes; the limit is 8."), b"552 5.3.4 The message is 9"),
        (
            GatewayError("A message needs at least one recipient.", code="5.5.1"),
            b"554 5.5.1 A message",
        ),
        (RuntimeError("a bug"), b"451 4.3.0 The gateway hit an internal error"),
    ],
)
async def test_a_failed_submit_is_never_250(
    gw: SMTPGateway,
    recorder: Recorder,
    error: Exception,
    expected: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder.fail = error

    def run() -> smtplib.SMTPDataError:
        with connect(gw) as client:
            client.login("alice", PASSWORD)
            with pytest.raises(smtplib.SMTPDataError) as err:
                client.sendmail(str(ALICE), [str(BOB)], message())
            return err.value

    err = await in_thread(run)
    assert (f"{err.smtp_code} ".encode() + err.smtp_error).startswith(expected)


# --- the real Submissions ----------------------------------------------------------------


@pytest.fixture
async def real(tmp_path: Path) -> AsyncIterator[tuple[DeviceNode, Submissions, AccountStore]]:
    """A provisioned user with a real device.db, as onionpost/app/node.py builds it."""
    clock = SystemClock()
    dialer = DirectDialer({})
    inbox = InboxNode(tmp_path, "inbox", clock, dialer)
    account = inbox.provision("alice")
    node = DeviceNode(tmp_path, "device", account, clock, dialer)
    submissions = Submissions(
        db=node.db,
        filer=node.filer,
        devices={node.user: node.device},
        clock=clock,
        config=DeliveryConfig(),
        unit_random=random.Random(1).random,
        max_message_bytes=GatewayConfig().max_message_bytes,
    )
    store = AccountStore(node.db, cost=CHEAP)
    store.add(node.user, str(node.address), PASSWORD)
    try:
        yield node, submissions, store
    finally:
        await node.close()
        inbox.close()


async def test_real_submissions_queue_the_message_and_file_it_in_sent(
    start: Start, real: tuple[DeviceNode, Submissions, AccountStore]
) -> None:
    node, submissions, store = real
    gw = await start(submit=submissions.submit, accounts=store)
    me = node.address
    msg = message(sender=me, to=BOB, extra="")

    def run() -> tuple[int, bytes]:
        with connect(gw) as client:
            client.login(node.user, PASSWORD)
            client.mail(str(me))
            client.rcpt(str(BOB))
            client.rcpt(str(CAROL))
            return client.data(msg)

    code, text = await in_thread(run)
    assert code == 250
    sid = int(text.rsplit(b" ", 1)[1])
    queued = SubmissionStore(node.db).listing(node.user)
    assert {(r.submission_id, r.address) for r in queued} == {(sid, str(BOB)), (sid, str(CAROL))}
    stored = SubmissionStore(node.db).message(sid)
    assert stored.endswith(msg) and stored.startswith(b"Message-ID: <")
    assert len(node.filed("Sent")) == 1


async def test_real_submissions_refusal_reaches_the_client(
    start: Start, real: tuple[DeviceNode, Submissions, AccountStore]
) -> None:
    """An account whose device is not running: submit() refuses, and the client hears it."""
    node, submissions, store = real
    store.add("ghost", str(CAROL), PASSWORD)
    gw = await start(submit=submissions.submit, accounts=store)

    def run() -> smtplib.SMTPDataError:
        with connect(gw) as client:
            client.login("ghost", PASSWORD)
            with pytest.raises(smtplib.SMTPDataError) as err:
                client.sendmail(str(CAROL), [str(BOB)], message(sender=CAROL))
            return err.value

    err = await in_thread(run)
    assert (err.smtp_code, err.smtp_error[:6]) == (550, b"5.1.1 ")
    assert SubmissionStore(node.db).listing() == []


def _subjects(node: DeviceNode, folder: str) -> list[str]:
    return [str(message_from_bytes(m)["Subject"]) for m in node.filed(folder)]


async def test_mail_to_yourself_is_filed_in_your_inbox_at_once(
    start: Start, real: tuple[DeviceNode, Submissions, AccountStore]
) -> None:
    node, submissions, store = real
    gw = await start(submit=submissions.submit, accounts=store)
    me = node.address

    def run() -> None:
        with connect(gw) as client:
            client.login(node.user, PASSWORD)
            client.sendmail(str(me), [str(me)], message(sender=me, to=me, extra=""))
            # a blind copy to yourself, named only in RCPT TO, as Thunderbird sends Bcc
            blind = message(sender=me, to=BOB, extra="").replace(b"test", b"bcc", 1)
            client.sendmail(str(me), [str(BOB), str(me)], blind)

    await in_thread(run)
    assert _subjects(node, "INBOX") == ["test", "bcc"]  # there when the client heard 250
    assert _subjects(node, "Sent") == ["test", "bcc"]
    await submissions.process_due()  # bob's inbox is unreachable; yours needs nothing
    waiting = SubmissionStore(node.db).listing(node.user)
    assert [r.address for r in waiting] == [str(BOB)]
    assert _subjects(node, "INBOX") == ["test", "bcc"]  # no delay notice, no bounce coming


async def test_mail_to_yourself_reaches_your_other_devices_inbox(
    tmp_path: Path, start: Start
) -> None:
    clock = SystemClock()
    dialer = DirectDialer({})
    inbox = InboxNode(tmp_path, "inbox", clock, dialer)
    laptop_account = inbox.provision("alice", "laptop")
    phone_account = inbox.add_device(laptop_account, "phone")
    laptop = DeviceNode(tmp_path, "laptop", laptop_account, clock, dialer)
    phone = DeviceNode(tmp_path, "phone", phone_account, clock, dialer)
    await inbox.start(worker=False)
    try:
        store = AccountStore(laptop.db, cost=CHEAP)
        store.add(laptop.user, str(laptop.address), PASSWORD)
        gw = await start(submit=laptop.submissions.submit, accounts=store)
        me = laptop.address

        def run() -> None:
            with connect(gw) as client:
                client.login(laptop.user, PASSWORD)
                client.sendmail(str(me), [str(me)], message(sender=me, to=me, extra=""))
                blind = message(sender=me, to=BOB, extra="").replace(b"test", b"bcc", 1)
                client.sendmail(str(me), [str(BOB), str(me)], blind)
                plain = message(sender=me, to=BOB, extra="").replace(b"test", b"plain", 1)
                client.sendmail(str(me), [str(BOB)], plain)

        await in_thread(run)
        await laptop.submissions.process_due()
        await inbox.worker.run_due()
        await phone.device.sync()
        assert sorted(_subjects(phone, "INBOX")) == ["bcc", "test"]
        assert sorted(_subjects(phone, "Sent")) == ["bcc", "plain", "test"]
        await laptop.submissions.check_outbox(laptop.device)
        waiting = SubmissionStore(laptop.db).listing(laptop.user)
        assert {r.address for r in waiting} == {str(BOB)}  # yours were delivered
    finally:
        await laptop.close()
        await phone.close()
        await inbox.stop()
        inbox.db.close()


# --- robustness --------------------------------------------------------------------------


async def test_pipelined_commands_in_one_write(gw: SMTPGateway, recorder: Recorder) -> None:
    body = (
        message().replace(b"Hello.", b".Hello, dot-stuffed").replace(b"\r\n.Hello", b"\r\n..Hello")
    )
    script = b"".join(
        [
            b"EHLO x\r\n",
            b"AUTH PLAIN " + plain("alice", PASSWORD).encode() + b"\r\n",
            f"MAIL FROM:<{ALICE}>\r\n".encode(),
            f"RCPT TO:<{BOB}>\r\n".encode(),
            b"RCPT TO:<someone@example.com>\r\n",
            f"RCPT TO:<{CAROL}>\r\n".encode(),
            b"DATA\r\n",
            body,
            b".\r\n",
            b"NOOP\r\n",
            b"RSET\r\n",
            b"QUIT\r\n",
        ]
    )
    replies = await converse(gw, script)
    codes = [r[:3] for r in replies if not r.startswith(b"250-")]
    assert codes == [
        b"220",
        b"250",
        b"235",
        b"250",
        b"250",
        b"550",
        b"250",
        b"354",
        b"250",
        b"250",
        b"250",
        b"221",
    ]
    assert recorder.calls[0][1] == [BOB, CAROL]
    assert b"\r\n.Hello, dot-stuffed" in recorder.calls[0][2]


async def test_garbage_gets_clear_replies_and_the_gateway_stays_up(gw: SMTPGateway) -> None:
    replies = await converse(
        gw,
        b"\r\n"  # empty line
        + b"EHLO x\r\n"
        + b"\xff\xfe binary\r\n"
        + b"MAIL "
        + b"A" * 600
        + b"\r\n"  # longer than a command may be
        + b"X" * 5000
        + b"\r\n"  # longer than the line buffer
        + b"DATA\r\n"
        + b"QUIT\r\n",
    )
    texts = [r.decode() for r in replies if not r.startswith(b"250-")]
    assert texts[1] == "500 5.5.2 Syntax error: the command line is empty or unreadable."
    assert texts[3] == "500 5.5.2 Syntax error: the command line is empty or unreadable."
    assert texts[4] == "500 5.5.2 The command line is too long."
    assert texts[5] == "500 5.5.2 The command line is too long."
    assert texts[6].startswith("530 5.7.0 Authentication required")
    assert texts[7] == "221 2.0.0 Bye"


async def test_broken_auth_exchanges_get_clear_replies(
    gw: SMTPGateway, caplog: pytest.LogCaptureFixture
) -> None:
    replies = await converse(
        gw,
        b"EHLO x\r\n"
        + b"AUTH LOGIN\r\n" + b"A" * 5000 + b"\r\n"  # an answer longer than a line may be
        + b"AUTH PLAIN not-base64!\r\n"
        + b"AUTH PLAIN " + base64.b64encode(b"no separators") + b"\r\n"
        + b"AUTH PLAIN\r\n*\r\n"  # the client cancels
        + b"AUTH CRAM-MD5\r\n"
        + b"QUIT\r\n",
    )  # fmt: skip
    texts = [r.decode() for r in replies if not r.startswith((b"250", b"220", b"334"))]
    assert texts == [
        "501 5.5.2 The AUTH answer is too long.",
        "501 5.5.2 The AUTH data is not valid base64.",
        "501 5.5.2 AUTH PLAIN data must be: authorization id, NUL, user name, NUL, password.",
        "501 5.7.0 Authentication cancelled.",
        "504 5.5.4 Unknown authentication mechanism; use PLAIN or LOGIN.",
        "221 2.0.0 Bye",
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_unknown_commands_are_not_echoed_and_end_the_session(gw: SMTPGateway) -> None:
    secret = base64.b64encode(PASSWORD.encode())
    replies = await converse(gw, b"EHLO x\r\n" + b"".join(secret + b"%d\r\n" % i for i in range(6)))
    texts = [r for r in replies if not r.startswith(b"250")]
    assert texts[1:5] == [b"500 5.5.1 Unknown command."] * 4
    assert texts[5] == b"502 5.5.1 Too many unknown commands; closing the connection."
    assert not any(secret in r for r in replies)


async def test_idle_sessions_are_told_and_closed(start: Start) -> None:
    gw = await start(idle_timeout=0.3)
    reader, writer = await open_raw(gw)
    assert await read_reply(reader) == [
        b"421 4.4.2 Closing the connection: nothing arrived for 0.3 seconds."
    ]
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    await asyncio.sleep(0.05)
    assert gw.sessions == 0


async def test_a_stalled_data_transfer_times_out(start: Start) -> None:
    gw = await start(idle_timeout=0.3)
    reader, writer = await open_raw(gw)
    for command in (
        b"EHLO x",
        b"AUTH PLAIN " + plain("alice", PASSWORD).encode(),
        f"MAIL FROM:<{ALICE}>".encode(),
        f"RCPT TO:<{BOB}>".encode(),
        b"DATA",
    ):
        writer.write(command + b"\r\n")
        await read_reply(reader)
    writer.write(b"Subject: half a message\r\n")
    assert (await read_reply(reader))[0].startswith(b"421 4.4.2")
    writer.close()
    await writer.wait_closed()


async def test_500_concurrent_sessions(gw: SMTPGateway) -> None:
    count = 500
    greeted = 0
    all_in = asyncio.Event()
    observed: list[int] = []

    async def session() -> bytes:
        nonlocal greeted
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        try:
            await read_reply(reader)
            writer.write(b"EHLO x\r\n")
            await read_reply(reader)
            greeted += 1
            if greeted == count:
                observed.append(gw.sessions)
                all_in.set()
            await all_in.wait()  # every session is open at this moment
            writer.write(b"QUIT\r\n")
            return (await read_reply(reader))[0]
        finally:
            writer.close()
            await writer.wait_closed()

    byes = await asyncio.gather(*(session() for _ in range(count)))
    assert byes == [b"221 2.0.0 Bye"] * count
    assert observed == [count]

    def still_up() -> tuple[int, bytes]:
        with connect(gw) as client:
            return client.login("alice", PASSWORD)

    assert (await in_thread(still_up))[0] == 235


async def test_sessions_over_the_limit_are_turned_away_politely(start: Start) -> None:
    gw = await start(max_sessions=3)
    held = [await open_raw(gw) for _ in range(3)]
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    assert await read_reply(reader) == [
        b"421 4.7.0 Too many open connections to the gateway; try again in a moment."
    ]
    writer.close()
    await writer.wait_closed()
    for _, w in held:
        w.close()
        await w.wait_closed()
    await asyncio.sleep(0.05)
    reader, writer = await open_raw(gw)  # room again
    writer.close()
    await writer.wait_closed()


async def test_close_hangs_up_on_open_sessions(start: Start) -> None:
    gw = await start()
    reader, writer = await open_raw(gw)
    await gw.close()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await writer.wait_closed()


# --- secrets -------------------------------------------------------------------------------


async def test_passwords_never_reach_the_logs(
    gw: SMTPGateway, caplog: pytest.LogCaptureFixture, cafile: str
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = [PASSWORD, "wrong password!"]

    def run() -> None:
        for secret in secrets:
            with connect(gw) as client:
                client.user, client.password = "alice", secret
                if secret == PASSWORD:
                    code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
                    assert code == 235
                else:  # a wrong password must be refused, not just kept out of the log
                    with pytest.raises(smtplib.SMTPAuthenticationError):
                        client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        with connect(gw) as client:
            client.starttls(context=ssl.create_default_context(cafile=cafile))
            client.ehlo("x")
            client.login("alice", PASSWORD)
            client.sendmail(str(ALICE), [str(BOB)], message())

    await in_thread(run)
    # A refused AUTH followed by pipelined credentials, read as commands:
    await converse(gw, b"AUTH LOGIN\r\n" + base64.b64encode(PASSWORD.encode()) + b"\r\nQUIT\r\n")
    await converse(
        gw,
        b"EHLO x\r\nAUTH PLAIN "
        + plain("alice", PASSWORD).encode()
        + b"\r\nAUTH PLAIN x\r\nQUIT\r\n",
    )

    assert any(r.name == "gateway.smtp" for r in caplog.records)  # logging did run
    logged = caplog.text + " ".join(str(r.args) for r in caplog.records)
    for secret in secrets:
        assert secret not in logged
        assert base64.b64encode(secret.encode()).decode() not in logged
        assert plain("alice", secret) not in logged
    # Who wrote to whom is not logged either.
    assert str(BOB) not in logged


def test_no_thread_was_started_for_the_server() -> None:
    """aiosmtpd's Controller would run a second loop in a thread; start_smtp must not."""
    before = threading.active_count()

    async def main() -> None:
        db = Database(":memory:", ["accounts"])
        try:
            gw = await start_smtp(
                GatewayConfig(smtp_port=0), submit=Recorder(), accounts=AccountStore(db), tls=None
            )
            assert threading.active_count() == before
            await gw.close()
        finally:
            db.close()

    asyncio.run(main())


async def test_a_50_mib_message_goes_from_smtp_to_the_recipients_inbox_intact(
    tmp_path: Path, start: Start
) -> None:
    """The whole path with the largest message the gateway accepts: SMTP, the durable
    submission, sealing, the outbox, delivery to another inbox over HTTP, acceptance, the
    recipient device's fetch, opening and filing (the header repaired, the body streamed into
    the filing queue).  What is filed is what was sent."""
    clock = SystemClock()
    dialer = DirectDialer({})
    home, away = InboxNode(tmp_path, "a", clock, dialer), InboxNode(tmp_path, "b", clock, dialer)
    await home.start(worker=False)
    await away.start(worker=False)
    alice = DeviceNode(tmp_path, "alice", home.provision("alice"), clock, dialer)
    bob = DeviceNode(tmp_path, "bob", away.provision("bob"), clock, dialer)
    store = AccountStore(alice.db, cost=CHEAP)
    store.add(alice.user, str(alice.address), PASSWORD)
    try:
        gw = await start(submit=alice.submissions.submit, accounts=store)
        limit = GatewayConfig().max_message_bytes
        head = (
            f"From: Alice <{alice.address}>\r\nTo: <{bob.address}>\r\nSubject: big\r\n"
            "Message-ID: <big@example.onion>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        raw = random.Random(50).randbytes((limit - len(head)) // 78 * 57)
        body = base64.encodebytes(raw).replace(b"\n", b"\r\n")
        sent = head + body
        assert limit - 78 < len(sent) <= limit

        def run() -> None:
            with connect(gw) as client:
                client.login(alice.user, PASSWORD)
                client.sendmail(str(alice.address), [str(bob.address)], sent)

        await in_thread(run)
        await alice.submissions.process_due()
        assert await home.worker.run_due() == 1
        assert await bob.device.sync() == 1
        (filed,) = bob.filed("INBOX")
        filed_head, _, filed_body = filed.partition(b"\r\n\r\n")
        assert filed_body == body  # streamed into the filing spool byte for byte
        assert b"\r\nX-Onionpost-Verified: " in b"\r\n" + filed_head
        assert b"\r\nSubject: big\r\n" in filed_head + b"\r\n"
        assert base64.b64decode(filed_body) == raw
    finally:
        await alice.close()
        await bob.close()
        await home.stop()
        await away.stop()
        home.close()
        away.close()
