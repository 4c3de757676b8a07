"""``onionpost demo``: the whole system on one machine, step by step, with timings.

It starts a private Tor network on 127.0.0.1 (directory authorities and relays of its own, so it
works offline and no packet leaves the machine), creates two people with a node each (each node
launches its own tor and publishes its inbox as an onion service), and sends a message the way a
mail client would: SMTP into alice's gateway, sealed for bob's device, delivered over tor to
bob's onion inbox, fetched, verified and filed, then read over IMAP from bob's gateway.  Then bob
replies, on warm circuits.  Everything is torn down at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import os
import smtplib
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from gateway.dovecot import Layout
from gateway.service import start_gateway
from gateway.setup import setup_account
from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import Config, load
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.errors import OnionpostError, UsageError
from onionpost.testing.tornet import TorNetwork

Say = Callable[[str], None]


@dataclass
class Person:
    name: str
    config: Config
    password: str
    node: Node | None = None

    @property
    def address(self) -> str:
        assert self.node is not None
        return str(self.node.devices[self.name].address)

    @property
    def ca(self) -> str:
        return str(self.config.data_dir / "tls" / "ca.pem")

    def port(self, which: str) -> int:
        assert self.node is not None
        return self.node.gateway_ports[which]


class _Timer:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def lap(self) -> float:
        return time.monotonic() - self.start


@contextlib.contextmanager
def _workdir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="onionpost-demo-") as tmp:
        if os.geteuid() == 0:
            # As root each node's Dovecot reads mail as another account, which must pass
            # through (search only: nothing in here can be listed or read by it).
            Path(tmp).chmod(0o711)
        yield Path(tmp)


async def run(say: Say, workdir: Path | None = None, network: TorNetwork | None = None) -> None:
    """Run the demo; ``network`` reuses a running private Tor network (tests do)."""
    with _workdir(workdir) as root:
        await _run(say, root, network)


async def _run(say: Say, root: Path, network: TorNetwork | None) -> None:
    say("onionpost demo: two people, two inboxes, a private Tor network, all on 127.0.0.1.\n")
    t = _Timer()
    say("[1/6] Starting a private Tor network (3 directory authorities, 5 relays) ...")
    net = network or TorNetwork(root / "tor-network")
    if network is None:
        try:
            await asyncio.to_thread(net.start, 150)
        except BaseException:
            await asyncio.to_thread(net.stop)
            raise
    people: list[Person] = []
    try:
        say(f"      ready in {t.lap():.1f} s: every tor process listens on 127.0.0.1 only.")
        t = _Timer()
        say("[2/6] Creating two people, each with an identity key and an inbox ...")
        for name in ("alice", "bob"):
            people.append(_create(root, name, net))
        for p in people:
            say(f"      {p.name}: identity {_fingerprint(p)}")
        say(f"      done in {t.lap():.1f} s.")
        t = _Timer()
        say("[3/6] Starting both nodes: each launches its own tor and publishes its inbox ...")
        for p in people:
            p.node = Node(p.config, clock=SystemClock(), extensions=(start_gateway,))
            await p.node.start(wait_for_tor=True)
            tor = p.node.tor
            status = tor.status() if tor else None
            pow_note = "on" if status and status.pow_enabled else "unavailable"
            say(f"      {p.address}")
            took = f"{t.lap():.1f} s"
            say(f"        onion service published after {took} (tor PoW defence {pow_note})")
        alice, bob = people
        await _exchange(say, alice, bob, "[4/6]", "Hello Bob", cold=True)
        await _exchange(say, bob, alice, "[5/6]", "Re: Hello Bob", cold=False)
    finally:
        say("[6/6] Stopping the nodes and the Tor network ...")
        for p in people:
            if p.node is not None:
                with contextlib.suppress(Exception):
                    await p.node.stop()
        if network is None:
            await asyncio.to_thread(net.stop)
        say("      all tor processes stopped. Nothing left this machine.")


def _create(root: Path, name: str, net: TorNetwork) -> Person:
    home = root / name
    result = initialize(
        load(home),
        local=name,
        device_name="laptop",
        now=int(time.time()),
        gateway_setup=setup_account,
    )
    overrides: dict[str, dict[str, object]] = {
        "tor": {"extra_torrc": net.client_torrc_lines(), "bootstrap_timeout": 90},
        "gateway": {"smtp_port": 0, "imap_port": 0, "autoconfig_port": 0},
        "delivery": {"retry_min_seconds": 2, "retry_max_seconds": 10},
    }
    if result.password is None:
        raise UsageError("The demo needs the mail gateway.")
    return Person(name, load(home, overrides), result.password)


def _fingerprint(p: Person) -> str:
    from onionpost.store.keystore import AccountFiles, KeyStore

    account = AccountFiles(KeyStore(p.config.data_dir)).load(p.name)
    return fingerprint(account.uik_pk)


async def _exchange(
    say: Say, frm: Person, to: Person, step: str, subject: str, *, cold: bool
) -> None:
    assert frm.node is not None and to.node is not None
    say(
        f'{step} {frm.name} sends "{subject}" to {to.name} through the mail gateway'
        + ("" if cold else " (circuits are warm now)")
    )
    t = _Timer()
    await asyncio.to_thread(_smtp_send, frm, to, subject)
    say(
        f"      {t.lap():6.2f} s  accepted by {frm.name}'s SMTP gateway "
        f"(127.0.0.1:{frm.port('smtp')}), stored durably"
    )
    outbox = frm.node.inbox.outbox if frm.node.inbox else None
    assert outbox is not None
    await _until(lambda: bool(outbox.rows(states=("queued", "delivered"))), 120)
    say(
        f"      {t.lap():6.2f} s  {to.name}'s keys fetched over tor"
        f"{' (first contact)' if cold else ''}; sealed for each of {to.name}'s devices"
    )
    await _until(lambda: bool(outbox.rows(states=("delivered",))) and not outbox.rows(), 180)
    say(f"      {t.lap():6.2f} s  delivered to {to.name}'s inbox over its onion service")
    await _until(lambda: _filed(to, subject), 120)
    say(
        f"      {t.lap():6.2f} s  {to.name}'s device fetched it, checked every signature, "
        "filed it in INBOX"
    )
    seen = await asyncio.to_thread(_imap_read, to, subject)
    say(
        f"      {t.lap():6.2f} s  {to.name}'s mail client reads it over IMAP "
        f"(127.0.0.1:{to.port('imap')}):"
    )
    for line in seen:
        say(f"                 {line}")


async def _until(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise OnionpostError("The demo timed out waiting for the message; see the log above.")
        await asyncio.sleep(0.05)


def _filed(p: Person, subject: str) -> bool:
    """Whether Dovecot has it in INBOX (new/ or cur/ of the Maildir)."""
    inbox = Layout(p.config.data_dir).maildir(p.name)
    needle = f"Subject: {subject}".encode()
    for sub in ("new", "cur"):
        with contextlib.suppress(OSError):
            for path in (inbox / sub).iterdir():
                with path.open("rb") as f:
                    if needle in f.read(65536):
                        return True
    return False


def _smtp_send(frm: Person, to: Person, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = frm.address
    msg["To"] = to.address
    msg["Subject"] = subject
    msg.set_content(f"Hi {to.name}, this went through Tor onion services and nothing else.\n")
    context = ssl.create_default_context(cafile=frm.ca)
    with smtplib.SMTP("127.0.0.1", frm.port("smtp"), timeout=30) as s:
        s.starttls(context=context)
        s.login(frm.name, frm.password)
        s.send_message(msg)


def _imap_read(p: Person, subject: str) -> list[str]:
    im = imaplib.IMAP4("127.0.0.1", p.port("imap"))
    try:
        im.starttls(ssl.create_default_context(cafile=p.ca))
        im.login(p.name, p.password)
        im.select("INBOX", readonly=True)
        _, data = im.search(None, "SUBJECT", f'"{subject}"')
        number = data[0].split()[-1]
        _, fetched = im.fetch(
            number, "(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT X-ONIONPOST-VERIFIED)])"
        )
        raw = fetched[0][1] if isinstance(fetched[0], tuple) else b""
        return [ln for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()]
    finally:
        with contextlib.suppress(Exception):
            im.logout()
