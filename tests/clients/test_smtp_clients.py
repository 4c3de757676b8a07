"""Real SMTP clients from Debian against the submission gateway: swaks and neomutt.

The gateway runs in the test's event loop; each client runs as a subprocess.  A missing
client is a failure, not a skip: ``make test`` installs them (scripts/system-deps.sh).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.autoconfig import start_autoconfig
from gateway.smtp import SMTPGateway, start_smtp
from gateway.smtpfront import SMTPFront, start_front
from gateway.thunderbird import GatewaySettings, render_user_js
from gateway.tls import ca_path, ensure_tls, server_context
from onionpost.base.config import GatewayConfig
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.store.accounts import AccountStore
from tests.accounts import account_store

pytestmark = pytest.mark.clients

PASSWORD = "swordfish in the onion"
ALICE = Address.for_key("alice", ed25519_public(SeededRandom(b"clients-home")(32)))
BOB = Address.for_key("bob", ed25519_public(SeededRandom(b"clients-away")(32)))


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed. Run `make test`, which installs the mail clients the "
            "tests drive (scripts/system-deps.sh test)."
        )
    return path


@dataclass
class Recorder:
    calls: list[tuple[str, list[Address], bytes]] = field(default_factory=list)

    def __call__(self, user: str, recipients: list[Address], message: bytes) -> int:
        self.calls.append((user, list(recipients), message))
        return len(self.calls)


@dataclass
class Gateway:
    server: SMTPGateway | SMTPFront
    recorder: Recorder
    cafile: Path


@pytest.fixture
def accounts() -> Iterator[AccountStore]:
    with account_store(("alice", str(ALICE), PASSWORD)) as store:
        yield store


async def _gateway(
    tmp_path: Path, accounts: AccountStore, *, require_tls: bool, where: str
) -> Gateway:
    recorder = Recorder()
    server: SMTPGateway | SMTPFront
    if where == "front":  # as a node runs it: the protocol in the SMTP front process
        ensure_tls(tmp_path / "tls")
        server = await start_front(
            GatewayConfig(smtp_port=0, require_tls=require_tls),
            submit=recorder,
            accounts=accounts,
            tls_dir=tmp_path / "tls",
            auth_failure_delay=0.0,
        )
        return Gateway(server, recorder, ca_path(tmp_path / "tls"))
    server = await start_smtp(
        GatewayConfig(smtp_port=0, require_tls=require_tls),
        submit=recorder,
        accounts=accounts,
        tls=server_context(tmp_path / "tls"),
        auth_failure_delay=0.0,
    )
    return Gateway(server, recorder, ca_path(tmp_path / "tls"))


@pytest.fixture(params=["in-process", "front"])
async def gateway(
    tmp_path: Path, accounts: AccountStore, request: pytest.FixtureRequest
) -> AsyncIterator[Gateway]:
    gw = await _gateway(tmp_path, accounts, require_tls=False, where=request.param)
    yield gw
    await gw.server.close()


@pytest.fixture(params=["in-process", "front"])
async def strict_gateway(
    tmp_path: Path, accounts: AccountStore, request: pytest.FixtureRequest
) -> AsyncIterator[Gateway]:
    gw = await _gateway(tmp_path, accounts, require_tls=True, where=request.param)
    yield gw
    await gw.server.close()


async def run(*argv: str, stdin: bytes = b"", home: Path | None = None) -> tuple[int, str]:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    if home is not None:
        env["HOME"] = str(home)
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


# --- swaks -----------------------------------------------------------------------------------


def swaks(gw: Gateway, *extra: str, to: str = str(BOB), password: str = PASSWORD) -> list[str]:
    return [
        binary("swaks"),
        "--server", "127.0.0.1",
        "--port", str(gw.server.port),
        "--from", str(ALICE),
        "--to", to,
        "--h-From", f"Alice <{ALICE}>",
        "--auth-user", "alice",
        "--auth-password", password,
        *extra,
    ]  # fmt: skip


async def test_swaks_auth_plain(gateway: Gateway) -> None:
    code, out = await run(*swaks(gateway, "--auth", "PLAIN"))
    assert code == 0, out
    assert "<-  235 2.7.0 Authentication successful." in out  # "-": no TLS layer
    assert "<-  250 2.0.0 Ok: queued as 1" in out
    user, recipients, message = gateway.recorder.calls[0]
    assert (user, recipients) == ("alice", [BOB])
    assert f"From: Alice <{ALICE}>".encode() in message


async def test_swaks_auth_login_over_starttls_verifying_the_local_ca(gateway: Gateway) -> None:
    code, out = await run(
        *swaks(
            gateway,
            "--auth", "LOGIN",
            "--tls", "--tls-verify", "--tls-ca-path", str(gateway.cafile),
        )
    )  # fmt: skip
    assert code == 0, out
    assert "=== TLS started" in out
    assert "<~  235 2.7.0 Authentication successful." in out  # "~" marks the TLS layer
    assert "<~  250 2.0.0 Ok: queued as 1" in out


async def test_swaks_refuses_the_certificate_without_the_local_ca(gateway: Gateway) -> None:
    code, out = await run(*swaks(gateway, "--auth", "PLAIN", "--tls", "--tls-verify"))
    assert code == 29, out  # swaks: error in TLS transaction
    assert gateway.recorder.calls == []


async def test_swaks_non_onion_recipient_is_refused_with_the_reason(gateway: Gateway) -> None:
    code, out = await run(*swaks(gateway, "--auth", "PLAIN", to="bob@example.com"))
    assert code == 24, out  # swaks: no RCPTs accepted
    assert (
        "<** 550 5.1.3 'bob@example.com' is not an onionpost address: onionpost delivers only "
        "to <56-character v3 onion>.onion domains."
    ) in out
    assert gateway.recorder.calls == []


async def test_swaks_wrong_password(gateway: Gateway) -> None:
    code, out = await run(*swaks(gateway, "--auth", "PLAIN", password="not it"))
    assert code == 28, out  # swaks: error in AUTH transaction
    assert "<** 535 5.7.8 The user name or password is wrong." in out
    assert gateway.recorder.calls == []


async def test_swaks_require_tls(strict_gateway: Gateway) -> None:
    code, out = await run(*swaks(strict_gateway, "--auth", "PLAIN"))
    assert code == 28, out  # no AUTH offered before STARTTLS
    code, out = await run(
        *swaks(strict_gateway, "--auth", "PLAIN", "--tls", "--tls-verify", "--tls-ca-path",
               str(strict_gateway.cafile))
    )  # fmt: skip
    assert code == 0, out
    assert len(strict_gateway.recorder.calls) == 1


# --- neomutt ---------------------------------------------------------------------------------


def muttrc(tmp_path: Path, gw: Gateway, *, trust_ca: bool) -> Path:
    """A batch-mode configuration: STARTTLS required, no local copy, no other lookups."""
    lines = [
        f'set from = "Alice <{ALICE}>"',
        "set use_from = yes",
        f'set hostname = "{ALICE.domain}"',  # the Message-ID must not name this machine
        f'set smtp_url = "smtp://alice@127.0.0.1:{gw.server.port}/"',
        f'set smtp_pass = "{PASSWORD}"',
        "set ssl_starttls = yes",
        "set ssl_force_tls = yes",
        f'set certificate_file = "{tmp_path / "neomutt-certificates"}"',
        'set record = ""',
        "set copy = no",
        f'set folder = "{tmp_path / "Mail"}"',
        "set user_agent = no",
    ]
    if trust_ca:
        lines.append(f'set ssl_ca_certificates_file = "{gw.cafile}"')
    path = tmp_path / ("muttrc-trusting" if trust_ca else "muttrc-untrusting")
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_neomutt_sends_over_starttls(tmp_path: Path, gateway: Gateway) -> None:
    config = muttrc(tmp_path, gateway, trust_ca=True)
    code, out = await run(
        binary("neomutt"), "-n", "-F", str(config), "-s", "from neomutt", str(BOB),
        stdin=b"Hello from neomutt.\n",
        home=tmp_path,
    )  # fmt: skip
    assert code == 0, out
    user, recipients, message = gateway.recorder.calls[0]
    assert (user, recipients) == ("alice", [BOB])
    assert f"From: Alice <{ALICE}>".encode() in message
    assert b"Subject: from neomutt" in message
    assert f"@{ALICE.domain}>".encode() in message  # neomutt's own Message-ID, kept as is
    assert message.endswith(b"Hello from neomutt.\r\n")


async def test_neomutt_does_not_send_without_the_local_ca(tmp_path: Path, gateway: Gateway) -> None:
    config = muttrc(tmp_path, gateway, trust_ca=False)
    code, out = await run(
        binary("neomutt"), "-n", "-F", str(config), "-s", "untrusted", str(BOB),
        stdin=b"Should not arrive.\n",
        home=tmp_path,
    )  # fmt: skip
    assert code != 0, out
    assert gateway.recorder.calls == []


# --- Thunderbird -----------------------------------------------------------------------------

CAROL = Address.for_key("carol", ed25519_public(SeededRandom(b"clients-home")(32)))

# Run in Thunderbird's chrome context through Marionette; each calls resolve(result).
_TRUST_CA = """
const [pem, resolve] = arguments;
const certdb = Cc["@mozilla.org/security/x509certdb;1"].getService(Ci.nsIX509CertDB);
const b64 = pem.replace(/-----[^-]+-----/g, "").replace(/\\s+/g, "");
certdb.addCertFromBase64(b64, "C,,");
resolve(true);
"""
_ACCOUNTS = """
const [resolve] = arguments;
const { MailServices } = ChromeUtils.importESModule("resource:///modules/MailServices.sys.mjs");
const account = MailServices.accounts.defaultAccount;
const server = account.incomingServer;
const identity = account.defaultIdentity;
const smtp = MailServices.outgoingServer.getServerByIdentity(identity);
resolve({
  incoming: [server.type, server.hostname, server.port, server.username, server.socketType,
             server.authMethod],
  identity: [identity.email, identity.fullName, identity.fccFolderURI],
  outgoing: [smtp.type, smtp.serverURI.spec, smtp.socketType, smtp.authMethod],
  defaultOutgoing: MailServices.outgoingServer.defaultServer.key == smtp.key,
  accounts: MailServices.accounts.accounts.length,
});
"""
_FETCH_CONFIG = """
const [domain, resolve] = arguments;
const { FetchConfig } = ChromeUtils.importESModule(
  "resource:///modules/accountcreation/FetchConfig.sys.mjs");
FetchConfig.fromDB(domain, new AbortController().signal).then(
  c => resolve({
    incoming: [c.incoming.hostname, c.incoming.port, c.incoming.socketType, c.incoming.auth],
    outgoing: [c.outgoing.hostname, c.outgoing.port, c.outgoing.socketType, c.outgoing.auth],
  }),
  e => resolve({error: String(e)}));
"""
_SEND = """
const [to, bcc, password, resolve] = arguments;
const { MailServices } = ChromeUtils.importESModule("resource:///modules/MailServices.sys.mjs");
const account = MailServices.accounts.defaultAccount;
const identity = account.defaultIdentity;
identity.doFcc = false;  // no IMAP server in this test to file the Sent copy on
const fields = Cc["@mozilla.org/messengercompose/composefields;1"]
  .createInstance(Ci.nsIMsgCompFields);
fields.from = `${identity.fullName} <${identity.email}>`;
fields.to = to;
fields.bcc = bcc;
fields.subject = "From Thunderbird";
fields.body = "Hello from Thunderbird.\\r\\n";
const listener = {
  QueryInterface: ChromeUtils.generateQI(["nsIMsgSendListener"]),
  onStartSending() {}, onProgress() {}, onStatus() {}, onGetDraftFolderURI() {},
  onTransportSecurityError(id, status) { resolve({securityError: status}); },
  onSendNotPerformed(id, status) { resolve({notPerformed: status}); },
  onStopSending(id, status) { resolve({status}); },
};
Cc["@mozilla.org/messengercompose/send;1"].createInstance(Ci.nsIMsgSend).createAndSendMessage(
  null, identity, account.key, fields, false, false, Ci.nsIMsgSend.nsMsgDeliverNow, null,
  "text/plain", fields.body, null, null, listener, password, "", Ci.nsIMsgCompType.New);
"""


def _marionette() -> type:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its dependencies warn on import
            from marionette_driver.marionette import Marionette
    except ImportError:
        pytest.fail("marionette_driver is missing. Run `make test`, which installs '.[test]'.")
    return Marionette  # type: ignore[no-any-return]


async def _marionette_port(profile: Path, proc: asyncio.subprocess.Process) -> int:
    port_file = profile / "MarionetteActivePort"
    for _ in range(240):
        if proc.returncode is not None:
            pytest.fail(f"Thunderbird exited early with status {proc.returncode}.")
        if port_file.exists() and port_file.read_text().strip():
            return int(port_file.read_text())
        await asyncio.sleep(0.25)
    pytest.fail("Thunderbird did not start Marionette within 60 seconds.")


async def test_thunderbird_account_from_user_js_sends_through_the_gateway(
    tmp_path: Path, gateway: Gateway
) -> None:
    """Thunderbird 153 with only the generated user.js: the account exists, the settings
    come from the local autoconfig endpoint, and a message goes out over STARTTLS."""
    thunderbird = binary("thunderbird")
    marionette = _marionette()
    autoconfig = await start_autoconfig(
        GatewayConfig(autoconfig_port=0), lambda: [ALICE.domain], smtp_port=gateway.server.port
    )
    profile = tmp_path / "profile"
    profile.mkdir()
    settings = GatewaySettings(
        ALICE,
        imap_port=1,  # nothing listens: this test is about sending
        smtp_port=gateway.server.port,
        autoconfig_port=autoconfig.port,
        ca_path=gateway.cafile,
        require_tls=False,
        full_name="Alice",
    )
    server_key = f"onionpost_{ALICE.local}_"  # prefix of the generated keys
    test_only = [
        'user_pref("marionette.port", 0);',
        'user_pref("app.update.enabled", false);',
        'user_pref("mail.shell.checkDefaultClient", false);',
    ]
    # Without an IMAP server a startup login would raise a modal alert, which blocks
    # headless Thunderbird's main thread (and Marionette with it).
    user_js = render_user_js(settings)
    for line in user_js.splitlines():
        if line.startswith(f'user_pref("mail.server.{server_key}') and (
            ".login_at_startup" in line or ".check_new_mail" in line
        ):
            test_only.append(line.replace("true", "false"))
    (profile / "user.js").write_text(user_js + "\n".join(test_only) + "\n")

    proc = await asyncio.create_subprocess_exec(
        thunderbird, "--headless", "--marionette", "--remote-allow-system-access",
        "--no-remote", "--profile", str(profile),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "HOME": str(tmp_path), "MOZ_CRASHREPORTER_DISABLE": "1"},
    )  # fmt: skip
    try:
        port = await _marionette_port(profile, proc)

        def drive() -> dict[str, object]:
            client = marionette(host="127.0.0.1", port=port, socket_timeout=60)
            client.start_session()
            try:
                client.set_context("chrome")

                def run(script: str, *args: object) -> object:
                    return client.execute_async_script(script, list(args), script_timeout=60_000)

                run(_TRUST_CA, gateway.cafile.read_text())
                return {
                    "accounts": run(_ACCOUNTS),
                    "autoconfig": run(_FETCH_CONFIG, ALICE.domain),
                    "send": run(_SEND, str(BOB), str(CAROL), PASSWORD),
                }
            finally:
                client.delete_session()

        seen = await asyncio.to_thread(drive)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await autoconfig.close()

    accounts = seen["accounts"]
    assert isinstance(accounts, dict)
    assert accounts["incoming"] == ["imap", "127.0.0.1", 1, "alice", 2, 3]
    assert accounts["identity"] == [str(ALICE), "Alice", "imap://alice@127.0.0.1/Sent"]
    port = gateway.server.port
    assert accounts["outgoing"] == ["smtp", f"smtp://alice@127.0.0.1:{port}/", 2, 3]
    assert accounts["defaultOutgoing"] is True
    assert accounts["accounts"] == 2  # ours and Local Folders, nothing else
    assert seen["autoconfig"] == {
        "incoming": ["127.0.0.1", 1143, 2, 3],
        "outgoing": ["127.0.0.1", port, 2, 3],
    }
    assert seen["send"] == {"status": 0}
    user, recipients, message = gateway.recorder.calls[0]
    assert (user, recipients) == ("alice", [BOB, CAROL])
    headers = message.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: From Thunderbird" in headers
    assert str(ALICE).encode() in headers
    assert str(CAROL).encode() not in headers  # Bcc stays in the envelope
    assert b"User-Agent" not in headers  # the privacy prefs took effect
