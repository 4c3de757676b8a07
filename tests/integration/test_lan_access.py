"""LAN access (``[gateway] lan``): SMTP and IMAP on this machine's LAN address, TLS required.

The SMTP tests run the real gateway (port 0) and talk to it through this machine's own
non-loopback address, which is as close to "another computer on the LAN" as one machine
gets: the connection's local and peer addresses are both that address, not loopback.
The IMAP test starts a real private Dovecot (``gateway.dovecot``) listening everywhere.
"""

from __future__ import annotations

import asyncio
import imaplib
import ipaddress
import shutil
import smtplib
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.dovecot import (
    DovecotServer,
    Identity,
    Installation,
    Layout,
    Settings,
    find_installation,
    render_config,
)
from gateway.lan import local_addresses, tls_names
from gateway.smtp import SMTPGateway, start_smtp
from gateway.tls import (
    ca_path,
    certificate_names,
    ensure_lan_tls,
    ensure_tls,
    lan_server_context,
    server_context,
)
from onionpost.base.config import GatewayConfig
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import MailServerNotInstalled
from onionpost.store.accounts import AccountStore
from onionpost.testing.ports import free_port
from tests.accounts import account_store

PASSWORD = "correct horse battery staple"
ALICE = Address.for_key("alice", ed25519_public(SeededRandom(b"lan-home")(32)))


def _lan_address() -> str:
    """A non-loopback IPv4 address of this machine that accepts connections to itself."""
    for address in local_addresses():
        if address.version != 4:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((str(address), 0))
            except OSError:
                continue
        return str(address)
    pytest.skip(
        "this machine has no non-loopback IPv4 address, so LAN access cannot be tested here"
    )


@pytest.fixture
def lan_address() -> str:
    return _lan_address()


@pytest.fixture
def accounts() -> Iterator[AccountStore]:
    with account_store(("alice", str(ALICE), PASSWORD)) as store:
        yield store


def _submit(user: str, recipients: list[Address], message: bytes) -> int:
    return 1


@pytest.fixture
async def lan_smtp(tmp_path: Path, accounts: AccountStore) -> AsyncIterator[SMTPGateway]:
    tls_dir = tmp_path / "tls"
    names = tls_names()
    gateway = await start_smtp(
        GatewayConfig(smtp_port=0, lan=True),
        submit=_submit,
        accounts=accounts,
        tls=server_context(tls_dir),
        lan_tls=lan_server_context(tls_dir, names.dns, names.ips),
    )
    yield gateway
    await gateway.close()


def _lan_client_context(tls_dir: Path) -> ssl.SSLContext:
    """What a mail client on another computer has: the LAN CA imported, nothing else."""
    return ssl.create_default_context(cafile=str(tls_dir / "lan-ca.pem"))


async def test_smtp_on_the_lan_wants_starttls_before_auth(
    lan_smtp: SMTPGateway, lan_address: str, tmp_path: Path
) -> None:
    assert "0.0.0.0" in lan_smtp.hosts

    def session() -> tuple[tuple[int, bytes], tuple[int, bytes], tuple[int, bytes]]:
        with smtplib.SMTP(lan_address, lan_smtp.port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert not client.has_extn("auth"), "AUTH must not be offered before STARTTLS"
            refused = client.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")
            mail = client.docmd("MAIL", f"FROM:<{ALICE}>")
            client.starttls(context=_lan_client_context(tmp_path / "tls"))
            client.ehlo()
            assert client.has_extn("auth")
            accepted = client.login("alice", PASSWORD)
            return refused, mail, accepted

    refused, mail, accepted = await asyncio.to_thread(session)
    assert refused[0] == 530 and refused[1].startswith(b"5.7.0"), refused
    assert mail[0] == 530, mail
    assert accepted[0] == 235, accepted


async def test_lan_certificate_names_the_address_and_checks_by_name(
    lan_smtp: SMTPGateway, lan_address: str, tmp_path: Path
) -> None:
    dns, ips = certificate_names(tmp_path / "tls" / "lan-cert.pem")
    assert ipaddress.ip_address(lan_address) in ips
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert f"{socket.gethostname().split('.')[0].lower()}.local" in dns

    def handshake(context: ssl.SSLContext) -> None:
        # The client checks the certificate against the address it dialled.
        with smtplib.SMTP(lan_address, lan_smtp.port, timeout=10) as client:
            client.starttls(context=context)

    await asyncio.to_thread(handshake, _lan_client_context(tmp_path / "tls"))
    # A client that trusts only the loopback CA cannot be fooled into accepting it.
    loopback_only = ssl.create_default_context(cafile=str(ca_path(tmp_path / "tls")))
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(handshake, loopback_only)


async def test_loopback_keeps_its_certificate_and_policy_with_lan_on(
    lan_smtp: SMTPGateway, tmp_path: Path
) -> None:
    """A local mail client that trusts only the first CA notices nothing; loopback keeps
    ``require_tls`` (off here), as Dovecot keeps it for IMAP."""

    def session() -> None:
        with smtplib.SMTP("127.0.0.1", lan_smtp.port, timeout=10) as client:
            client.login("alice", PASSWORD)  # plaintext on loopback, as without LAN access
        with smtplib.SMTP("127.0.0.1", lan_smtp.port, timeout=10) as client:
            context = ssl.create_default_context(cafile=str(ca_path(tmp_path / "tls")))
            client.starttls(context=context)
            client.login("alice", PASSWORD)

    await asyncio.to_thread(session)


async def test_with_lan_off_nothing_listens_on_the_lan_address(
    tmp_path: Path, accounts: AccountStore, lan_address: str
) -> None:
    gateway = await start_smtp(
        GatewayConfig(smtp_port=0),
        submit=_submit,
        accounts=accounts,
        tls=server_context(tmp_path / "tls"),
    )
    try:
        assert gateway.hosts == ["127.0.0.1"]
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(lan_address, gateway.port)
    finally:
        await gateway.close()


def test_lan_certificate_is_reissued_when_an_address_changes_under_the_same_ca(
    tmp_path: Path,
) -> None:
    tls_dir = tmp_path / "tls"
    first = ensure_lan_tls(tls_dir, ["pi", "pi.local"], [ipaddress.ip_address("192.168.1.20")])
    ca = first.ca_cert.read_bytes()
    leaf = first.cert.read_bytes()
    again = ensure_lan_tls(tls_dir, ["pi", "pi.local"], [ipaddress.ip_address("192.168.1.20")])
    assert again.cert.read_bytes() == leaf  # nothing changed: nothing reissued
    moved = ensure_lan_tls(tls_dir, ["pi", "pi.local"], [ipaddress.ip_address("192.168.1.31")])
    assert moved.ca_cert.read_bytes() == ca
    assert moved.cert.read_bytes() != leaf
    _, ips = certificate_names(moved.cert)
    assert ipaddress.ip_address("192.168.1.31") in ips
    assert ipaddress.ip_address("192.168.1.20") not in ips
    # An internet address is never named: the LAN CA may not vouch for it.
    public = ensure_lan_tls(tls_dir, ["pi"], [ipaddress.ip_address("8.8.8.8")])
    assert ipaddress.ip_address("8.8.8.8") not in certificate_names(public.cert)[1]


# --- IMAP: the private Dovecot, listening everywhere --------------------------------------


@pytest.fixture
def installation() -> object:
    try:
        return find_installation()
    except MailServerNotInstalled as exc:
        pytest.skip(f"Dovecot is not installed: {exc}")


def _free_port() -> int:
    return free_port("0.0.0.0")


class _IMAP(imaplib.IMAP4):
    """Connects from 127.0.0.1: Dovecot counts a client whose address is the server's own as
    local and "secured" (even with ``ssl = required``), which a client on another computer
    never is; from loopback to the LAN address, the addresses differ, as they would."""

    def _create_socket(self, timeout: float | None) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=("127.0.0.1", 0)
        )


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Under a 0755 folder: a root node's Dovecot mail account must pass through to it."""
    base = Path(tempfile.mkdtemp(prefix="oplan-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base / "data"
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_imap_on_the_lan_wants_starttls_before_login(
    data_dir: Path, installation: object, lan_address: str
) -> None:
    data = data_dir
    names = tls_names()
    lan = ensure_lan_tls(data / "tls", names.dns, names.ips)
    settings = Settings(host="0.0.0.0", imap_port=_free_port(), require_tls=True, lan_tls=lan)
    server = DovecotServer(Layout(data), settings)
    await server.start()
    try:
        await server.set_password("alice", PASSWORD)

        def session(host: str, cafile: Path) -> tuple[str, str]:
            with _IMAP(host, settings.imap_port, timeout=10) as imap:
                try:
                    imap.login("alice", PASSWORD)
                    plain = "accepted"
                except imaplib.IMAP4.error as exc:
                    plain = str(exc)
                imap.starttls(ssl.create_default_context(cafile=str(cafile)))
                typ, _ = imap.login("alice", PASSWORD)
                imap.logout()
                return plain, typ

        plain, typ = await asyncio.to_thread(session, lan_address, lan.ca_cert)
        assert "PRIVACYREQUIRED" in plain or "disallowed" in plain, plain
        assert typ == "OK"

        def local() -> str:
            # Loopback still gets the loopback certificate, which its CA verifies.
            with imaplib.IMAP4("127.0.0.1", settings.imap_port, timeout=10) as imap:
                imap.starttls(ssl.create_default_context(cafile=str(ca_path(data / "tls"))))
                typ, _ = imap.login("alice", PASSWORD)
                imap.logout()
                return str(typ)

        assert await asyncio.to_thread(local) == "OK"
    finally:
        await server.stop()


def test_dovecot_configuration_with_lan_access(tmp_path: Path) -> None:
    """Both syntaxes: the LAN certificate by default, loopback's for 127.0.0.1 and ::1."""
    layout = Layout(tmp_path / "data")
    tls = ensure_tls(layout.tls)
    lan = ensure_lan_tls(layout.tls, ["pi"], [ipaddress.ip_address("192.168.1.20")])
    ident = Identity(False, "op", 1000, 1000, "op", "op", "op")
    settings = Settings(host="0.0.0.0, ::", require_tls=True, lan_tls=lan)
    for version, cert in (((2, 3, 19), "ssl_cert = <"), ((2, 4, 1), "ssl_server_cert_file = ")):
        inst = Installation("dovecot", "doveadm", version, ".".join(map(str, version)), "X")
        text = render_config(inst, layout, ident, settings, tls)
        assert "ssl = required" in text and "0.0.0.0, ::" in text
        assert f"\n{cert}{lan.cert}\n" in text
        for address in ("127.0.0.1", "::1"):
            assert f"local {address} {{\n  {cert}{tls.cert}\n" in text
