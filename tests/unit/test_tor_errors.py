"""The tor boundary without tor: SOCKS reply codes in words, versions, PoW support, isolation."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path

import pytest
import socks

from onionpost.base.clock import SystemClock
from onionpost.base.config import TorConfig
from onionpost.core.address import onion_from_public_key
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import (
    BadOnionAddress,
    OnionClientAuthRejected,
    OnionClientAuthRequired,
    PeerConnectionFailed,
    PeerDescriptorInvalid,
    PeerIntroductionFailed,
    PeerIntroductionTimedOut,
    PeerOffline,
    PeerRefused,
    PeerRendezvousFailed,
    PeerTimedOut,
    PeerUnreachable,
    TorError,
    TorNotInstalled,
    TorNotRunning,
    TorTooOld,
)
from onionpost.net.tor.process import (
    _bootstrap_phase,
    check_version,
    parse_modules,
    parse_tor_version,
    pow_support,
)
from onionpost.net.tor.runtime import TorRuntime
from onionpost.net.tor.socks import (
    TorDialer,
    isolation_username,
    socks_reply_error,
    translate_socks_error,
)

ONION = onion_from_public_key(ed25519_public(SeededRandom(b"tor-errors")(32)))

CODES = [
    (0x01, PeerConnectionFailed),
    (0x05, PeerRefused),
    (0x06, PeerTimedOut),
    (0xF0, PeerOffline),
    (0xF1, PeerDescriptorInvalid),
    (0xF2, PeerIntroductionFailed),
    (0xF3, PeerRendezvousFailed),
    (0xF4, OnionClientAuthRequired),
    (0xF5, OnionClientAuthRejected),
    (0xF6, BadOnionAddress),
    (0xF7, PeerIntroductionTimedOut),
]


@pytest.mark.parametrize(("code", "cls"), CODES)
def test_each_onion_reply_code_has_its_own_error(code: int, cls: type[PeerUnreachable]) -> None:
    err = socks_reply_error(code)
    assert type(err) is cls
    assert isinstance(err, PeerUnreachable)
    assert str(err).endswith(".") and "0x" not in str(err)


def test_the_sentences_people_read() -> None:
    assert str(socks_reply_error(0xF0)) == (
        "The recipient's inbox is offline: its onion descriptor was not found."
    )
    assert "introduction failed" in str(socks_reply_error(0xF2))
    assert "introduction timed out" in str(socks_reply_error(0xF7))
    assert str(socks_reply_error(0x06)) == "The recipient's inbox did not answer in time."
    assert "not valid" in str(socks_reply_error(0xF6))


def test_permanent_and_temporary_failures() -> None:
    assert socks_reply_error(0xF0).temporary
    assert socks_reply_error(0xF2).temporary
    assert not socks_reply_error(0xF6).temporary
    assert not socks_reply_error(0xF4).temporary
    assert not socks_reply_error(0xF5).temporary


def test_unknown_codes_still_read_as_words() -> None:
    assert type(socks_reply_error(0x04)) is PeerUnreachable
    assert "host unreachable" in str(socks_reply_error(0x04))
    assert "0x99" in str(socks_reply_error(0x99))


def test_pysocks_exceptions_are_translated() -> None:
    # What PySocks 1.7.1 really raises: the reply wrapped as "Socket error: 0xf0: Unknown error".
    wrapped = socks.GeneralProxyError("Socket error", socks.SOCKS5Error("0xf0: Unknown error"))
    assert type(translate_socks_error(wrapped, "127.0.0.1:9050")) is PeerOffline
    bare = socks.SOCKS5Error("0xf6: Unknown error")
    assert type(translate_socks_error(bare, "127.0.0.1:9050")) is BadOnionAddress
    timeout = socks.GeneralProxyError("Socket error", TimeoutError("timed out"))
    assert type(translate_socks_error(timeout, "127.0.0.1:9050")) is PeerTimedOut
    refused = socks.ProxyConnectionError(
        "Error connecting to SOCKS5 proxy 127.0.0.1:9050", ConnectionRefusedError(111, "refused")
    )
    not_running = translate_socks_error(refused, "127.0.0.1:9050")
    assert type(not_running) is TorNotRunning and "127.0.0.1:9050" in str(not_running)
    auth = translate_socks_error(socks.SOCKS5AuthError("auth failed"), "127.0.0.1:9050")
    assert type(auth) is TorError
    closed = socks.GeneralProxyError("Connection closed unexpectedly")
    assert type(translate_socks_error(closed, "127.0.0.1:9050")) is TorError


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Tor version 0.4.9.11.\nThis build of Tor is covered by the GNU GPL", (0, 4, 9, 11)),
        ("Tor version 0.4.8.10 (git-3a4a7b3c8d37a2a7).", (0, 4, 8, 10)),
        ("0.4.9.2-alpha", (0, 4, 9, 2)),
        ("0.4.9.11", (0, 4, 9, 11)),
        ("Tor version 0.4.7.16.", (0, 4, 7, 16)),
        ("Tor version 0.5.0.", (0, 5, 0, 0)),
    ],
)
def test_version_parsing(text: str, version: tuple[int, int, int, int]) -> None:
    assert parse_tor_version(text) == version


def test_unparseable_version_is_a_tor_error() -> None:
    with pytest.raises(TorError):
        parse_tor_version("not tor at all")


def test_too_old_names_both_versions() -> None:
    with pytest.raises(TorTooOld) as caught:
        check_version((0, 4, 7, 16))
    assert "0.4.7.16" in str(caught.value) and "0.4.8.0" in str(caught.value)
    check_version((0, 4, 8, 0))
    check_version((0, 4, 9, 11))


def test_pow_needs_a_new_enough_tor_with_the_pow_module() -> None:
    modules = parse_modules("relay: yes\ndirauth: yes\ndircache: yes\npow: yes\n")
    assert modules == {"relay": True, "dirauth": True, "dircache": True, "pow": True}
    assert pow_support((0, 4, 9, 11), modules) == (True, None)
    assert pow_support((0, 4, 9, 2), modules) == (True, None)

    enabled, note = pow_support((0, 4, 8, 12), modules)
    assert not enabled and note is not None and "0.4.9.2" in note

    enabled, note = pow_support((0, 4, 9, 11), parse_modules("relay: yes\npow: no\n"))
    assert not enabled and note is not None and "pow module" in note

    enabled, note = pow_support((0, 4, 9, 11), None)
    assert enabled and note is not None  # tried, with a word of caution in the status


def test_isolation_usernames_separate_roles_and_destinations() -> None:
    other = onion_from_public_key(ed25519_public(SeededRandom(b"other")(32)))
    a = isolation_username(ONION, "deliver")
    assert a == isolation_username(ONION, "deliver")
    assert len({a, isolation_username(ONION, "fetch"), isolation_username(other, "deliver")}) == 3
    assert len(a) == 32 and all(c in "0123456789abcdef" for c in a)
    assert not isolation_username(ONION, "<torS0X>1").startswith("<torS0X>")


def test_bootstrap_phase_parsing() -> None:
    done = 'NOTICE BOOTSTRAP PROGRESS=100 TAG=done SUMMARY="Done"'
    assert _bootstrap_phase(done) == (100, "Done")
    stuck = (
        'WARN BOOTSTRAP PROGRESS=10 TAG=conn_done SUMMARY="Connected to a relay" '
        'WARNING="Connection refused" REASON=CONNECTREFUSED'
    )
    assert _bootstrap_phase(stuck) == (10, "Connected to a relay (problem: Connection refused)")


def test_status_is_frozen(tmp_path: Path) -> None:
    status = TorRuntime(TorConfig(), tmp_path, SystemClock()).status()
    assert status.bootstrap_percent == 0 and not status.published and status.onion is None
    with pytest.raises(FrozenInstanceError):
        status.published = True  # type: ignore[misc]


# --- the dialer against a fake SOCKS5 server on loopback --------------------------------------


@dataclass
class FakeSocks:
    """Answers every CONNECT with a fixed reply code and records what it was asked."""

    reply: int
    port: int = 0
    usernames: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, n = await reader.readexactly(2)
            methods = await reader.readexactly(n)
            assert 0x02 in methods  # PySocks offers username/password
            writer.write(b"\x05\x02")
            _, ulen = await reader.readexactly(2)
            self.usernames.append((await reader.readexactly(ulen)).decode())
            (plen,) = await reader.readexactly(1)
            await reader.readexactly(plen)
            writer.write(b"\x01\x00")
            _, _, _, atyp = await reader.readexactly(4)
            assert atyp == 0x03  # a domain name: tor resolves it, never us
            (hlen,) = await reader.readexactly(1)
            self.hosts.append((await reader.readexactly(hlen)).decode())
            await reader.readexactly(2)
            writer.write(bytes([5, self.reply, 0, 1, 0, 0, 0, 0, 0, 0]))
            await writer.drain()
            if self.reply == 0:
                writer.write(await reader.readexactly(4))  # echo one small message
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
async def fake_socks() -> AsyncIterator[FakeSocks]:
    fake = FakeSocks(reply=0)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    yield fake
    server.close()
    await server.wait_closed()


def runtime_using(tmp_path: Path, port: int) -> TorRuntime:
    runtime = TorRuntime(TorConfig(), tmp_path, SystemClock())
    runtime._socks = ("127.0.0.1", port)  # white-box: stands in for a started tor
    return runtime


async def test_dialer_connects_with_remote_dns_and_an_isolation_username(
    fake_socks: FakeSocks, tmp_path: Path
) -> None:
    runtime = runtime_using(tmp_path, fake_socks.port)
    reader, writer = await TorDialer(runtime).open(ONION, 80, isolation="deliver", timeout=5)
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    writer.close()
    await writer.wait_closed()
    assert fake_socks.hosts == [f"{ONION}.onion"]
    assert fake_socks.usernames == [isolation_username(ONION, "deliver")]
    assert runtime.status().last_outbound is not None


async def test_descriptor_not_found_is_retried_within_the_budget(
    fake_socks: FakeSocks, tmp_path: Path
) -> None:
    fake_socks.reply = 0xF0
    with pytest.raises(PeerOffline) as caught:
        await TorDialer(runtime_using(tmp_path, fake_socks.port)).open(
            ONION, 80, isolation="deliver", timeout=1.5
        )
    assert len(fake_socks.hosts) == 2  # one retry after ~1 s, then the budget was spent
    assert str(caught.value) == PeerOffline.summary()


async def test_a_bad_address_is_not_retried(fake_socks: FakeSocks, tmp_path: Path) -> None:
    fake_socks.reply = 0xF6
    with pytest.raises(BadOnionAddress):
        await TorDialer(runtime_using(tmp_path, fake_socks.port)).open(
            ONION, 80, isolation="deliver", timeout=5
        )
    assert len(fake_socks.hosts) == 1


async def test_invalid_onion_is_refused_before_tor_is_asked(tmp_path: Path) -> None:
    with pytest.raises(BadOnionAddress):
        await TorDialer(runtime_using(tmp_path, 9)).open(
            "example.com", 80, isolation="x", timeout=1
        )
    with pytest.raises(BadOnionAddress):
        await TorDialer(runtime_using(tmp_path, 9)).open(
            ONION[:-1] + "a", 80, isolation="x", timeout=1
        )


async def test_no_tor_listening_is_tor_not_running(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TorNotRunning) as caught:
        await TorDialer(runtime_using(tmp_path, port)).open(ONION, 80, isolation="x", timeout=2)
    assert f"127.0.0.1:{port}" in str(caught.value)
    with pytest.raises(TorNotRunning):
        await TorDialer(TorRuntime(TorConfig(), tmp_path, SystemClock())).open(
            ONION, 80, isolation="x", timeout=1
        )


async def test_launch_refuses_a_tor_that_is_too_old(tmp_path: Path) -> None:
    fake = tmp_path / "old-tor"
    fake.write_text("#!/bin/sh\necho 'Tor version 0.4.7.16.'\n")
    fake.chmod(0o755)
    with pytest.raises(TorTooOld) as caught:
        await TorRuntime.start(TorConfig(tor_binary=str(fake)), tmp_path, clock=SystemClock())
    assert "0.4.7.16" in str(caught.value) and "0.4.8.0" in str(caught.value)
    assert not (tmp_path / "tor" / "torrc").exists()  # refused before anything was written


async def test_launch_without_tor_says_how_to_install_it(tmp_path: Path) -> None:
    cfg = TorConfig(tor_binary=str(tmp_path / "no-such-tor"))
    with pytest.raises(TorNotInstalled) as caught:
        await TorRuntime.start(cfg, tmp_path, clock=SystemClock())
    assert "sudo apt-get install tor" in str(caught.value)
