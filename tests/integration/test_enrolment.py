"""The Pi-and-laptop set-up and a second device, on loopback (tor off, real nodes, real CLI).

An inbox-only node P hosts nobody's keys; `users invite` on it and `init --invite` on the
laptop L open alice's mailbox with keys made on L; L2 joins alice's identity through a
pairing relayed by P; mail flows to both devices and Sent copies reach the other device;
revoking L from L2 locks L out at once.  The same flows over the private Tor network are in
tests/tor/test_two_machines.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from onionpost.app import admin
from onionpost.app.node import Node
from onionpost.app.provision import adopt_account, initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import Config, load
from onionpost.core.address import Address
from onionpost.core.errors import CodeRefused, DeviceRefused, PairingFailed
from onionpost.core.pairing import Code
from onionpost.device.joining import inbox_dialer, join_identity, offer_pairing
from onionpost.store.keystore import AccountFiles, KeyStore
from onionpost.testing.mailstore import memory_mailbox, subjects
from onionpost.testing.ports import free_port

pytestmark = pytest.mark.asyncio(loop_scope="function")


def cli(home: Path, *args: str) -> tuple[int, str]:
    from onionpost.app.cli import cli as command

    result = CliRunner().invoke(command, ["--data-dir", str(home), *args])
    return result.exit_code, result.output


async def acli(home: Path, *args: str) -> tuple[int, str]:
    """The CLI from a thread: commands that reach an inbox run their own event loop."""
    return await asyncio.to_thread(cli, home, *args)


def write_config(home: Path, text: str) -> None:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    (home / "onionpost.toml").write_text(text)
    (home / "onionpost.toml").chmod(0o600)  # it may hold a tor control password


def tor_off(routes: dict[str, int], inbox: str = "") -> str:
    """A configuration without tor: onion labels routed to loopback ports."""
    table = "".join(f'"{k}" = "127.0.0.1:{v}"\n' for k, v in routes.items())
    return (
        "[delivery]\nretry_min_seconds = 1\nretry_max_seconds = 2\n"
        + "[inbox]\npow_bits = 4\nlongpoll_seconds = 1.0\n"
        + inbox
        + '[tor]\nmode = "off"\n[tor.static_routes]\n'
        + table
    )


@pytest.fixture
async def pi(tmp_path: Path) -> AsyncIterator[tuple[Node, str]]:
    home = tmp_path / "pi"
    code, out = cli(home, "init", "--role", "inbox")
    assert code == 0, out
    assert "Nobody's keys are here" in out
    onion = out.split("Inbox address:")[1].split()[0].removesuffix(".onion")
    port = free_port()
    write_config(
        home, 'role = "inbox"\n' + tor_off({}, f"listen_port = {port}\npairing_minutes = 1\n")
    )
    node = Node(load(home), extensions=(memory_mailbox,))
    await node.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: None)
    try:
        yield node, onion
    finally:
        await node.stop()
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)


async def eventually(check, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if check():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_pi_and_laptop_then_a_second_device(
    pi: tuple[Node, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p, onion = pi
    pi_home = p.config.data_dir
    # another household H, one machine, on its own inbox
    h_home = tmp_path / "h"
    h_port = free_port()
    write_config(h_home, tor_off({onion: p.api_port}, f"listen_port = {h_port}\n"))
    initialize(load(h_home), local="harry", device_name="desk", now=int(SystemClock().now()))
    h_onion = AccountFiles(KeyStore(h_home)).load("harry").address.onion
    p_routes = {h_onion: h_port}
    p.dialer.routes.update({k: f"127.0.0.1:{v}" for k, v in p_routes.items()})

    # invite on the Pi, redeem on the laptop
    code, out = await acli(pi_home, "users", "invite", "alice", "--json")
    assert code == 0, out
    invite = json.loads(out)
    assert invite["inbox"] == f"{onion}.onion" and invite["user"] == "alice"
    l_home = tmp_path / "laptop"
    write_config(l_home, tor_off({onion: p.api_port, h_onion: h_port}))
    code, out = await acli(l_home, "init", "--invite", invite["code"], "--device-name", "laptop")
    assert code == 0, out
    assert "alice@" + onion in out and "password:" in out
    assert 'role = "gateway"' in (l_home / "onionpost.toml").read_text()
    # the invite is single-use
    other = tmp_path / "other"
    write_config(other, tor_off({onion: p.api_port}))
    code, out = await acli(other, "init", "--invite", invite["code"])
    assert code == 1 and "already used" in out and "Traceback" not in out
    assert not (other / "users").exists()

    harry = Node(load(h_home), clock=SystemClock(), extensions=(memory_mailbox,))
    laptop = Node(load(l_home), clock=SystemClock(), extensions=(memory_mailbox,))
    await harry.start()
    await laptop.start()
    try:
        assert laptop.inbox is None and set(laptop.devices) == {"alice"}
        alice = laptop.devices["alice"].address
        hl = harry.devices["harry"].address
        assert laptop.submissions is not None and harry.submissions is not None
        laptop.submissions.submit("alice", [hl], mail_bytes(alice, hl, "from the laptop"))
        await eventually(lambda: "from the laptop" in subjects(harry, "harry"), "L->H")
        harry.submissions.submit("harry", [alice], mail_bytes(hl, alice, "to the laptop"))
        await eventually(lambda: "to the laptop" in subjects(laptop, "alice"), "H->L")

        # the laptop is off while mail comes; started again, it files that mail as it
        # starts, without a failed sync in its log, and the Pi is told at once
        await laptop.stop()
        harry.submissions.submit("harry", [alice], mail_bytes(hl, alice, "while off"))
        await eventually(lambda: spooled(p) == 1, "the Pi holding the mail")
        laptop = Node(load(l_home), clock=SystemClock(), extensions=(slow_mailbox,))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="onionpost"):
            await laptop.start()
            await eventually(lambda: "while off" in subjects(laptop, "alice"), "H->L, later")
            await eventually(lambda: spooled(p) == 0, "the Pi told of the filed mail", 5.0)
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text

        # a second device joins alice's identity through a pairing relayed by the Pi
        l2_home = tmp_path / "laptop2"
        write_config(l2_home, tor_off({onion: p.api_port, h_onion: h_port}))
        l_config, l2_config = load(l_home), load(l2_home)
        account = laptop.devices["alice"].account
        shown: asyncio.Queue[Code] = asyncio.Queue()
        files = AccountFiles(KeyStore(l_home))

        async def offer() -> object:
            async with inbox_dialer(l_config, say=print) as dialer:
                return await offer_pairing(
                    files.load("alice"),
                    l_config,
                    dialer=dialer,
                    say=print,
                    show_code=lambda c, _: shown.put_nowait(c),
                    clock=SystemClock(),
                    save=files.save,
                )

        async def join() -> object:
            code = await shown.get()
            async with inbox_dialer(l2_config, say=print) as dialer:
                return await join_identity(
                    l2_config,
                    Code.parse(code.text(), "pairing"),
                    device_name="laptop2",
                    with_identity=True,
                    dialer=dialer,
                    say=print,
                    clock=SystemClock(),
                )

        entry, joined = await asyncio.gather(offer(), join())
        assert entry.name == "laptop2"  # type: ignore[attr-defined]
        adopt_account(l2_config, joined, gateway_setup=None)  # type: ignore[arg-type]
        assert joined.identity is not None  # type: ignore[attr-defined]
        assert joined.uik_pk == account.uik_pk  # type: ignore[attr-defined]
        laptop2 = Node(load(l2_home), clock=SystemClock(), extensions=(memory_mailbox,))
        await laptop2.start()
        try:
            # the laptop learns of the new device from its inbox and files a notice
            await eventually(
                lambda: laptop.devices["alice"].account.device_list.version >= 2,
                "the laptop adopting the new device list",
            )
            await eventually(
                lambda: any("device was added" in s for s in subjects(laptop, "alice")),
                "a notice on the laptop",
            )
            # harry's next key fetch (his directory batches fetches for a minute) sees L2
            harry.devices["harry"].directory.forget(alice)
            harry.submissions.submit("harry", [alice], mail_bytes(hl, alice, "to both"))
            await eventually(lambda: "to both" in subjects(laptop, "alice"), "H->L")
            await eventually(lambda: "to both" in subjects(laptop2, "alice"), "H->L2")
            laptop.submissions.submit("alice", [hl], mail_bytes(alice, hl, "sent from L"))
            await eventually(lambda: "sent from L" in subjects(laptop2, "alice", "Sent"), "Sent")

            # L2 revokes L: the inbox refuses L at once; harry's next mail reaches only L2
            l_id = laptop.devices["alice"].account.device.device_id.hex()
            with admin.opened(l2_config) as local:
                await asyncio.to_thread(admin.revoke, local, l_id[:12])
            with pytest.raises(DeviceRefused):
                await laptop.devices["alice"].session.login()
            harry.devices["harry"].directory.forget(alice)
            harry.submissions.submit("harry", [alice], mail_bytes(hl, alice, "after revoke"))
            await eventually(lambda: "after revoke" in subjects(laptop2, "alice"), "H->L2")
            assert "after revoke" not in subjects(laptop, "alice")
        finally:
            await laptop2.stop()
    finally:
        await laptop.stop()
        await harry.stop()

    # the inbox-only machine holds no identity key, no device key and no plaintext
    assert not (pi_home / "users").exists()
    assert not (pi_home / "device.db").exists()
    db = sqlite3.connect(pi_home / "inbox.db")
    try:
        blobs = b"".join(
            bytes(v) if isinstance(v, bytes) else str(v).encode()
            for table in ("sealed", "outbox")
            for row in db.execute(f"SELECT * FROM {table}")
            for v in row
        )
    finally:
        db.close()
    for plain in (b"from the laptop", b"to the laptop", b"to both", b"sent from L"):
        assert plain not in blobs


async def slow_mailbox(node: Node) -> Callable[[], Awaitable[None]]:
    """:func:`memory_mailbox` ready half a second after the devices' syncs started, as
    Dovecot is on a real node."""
    await asyncio.sleep(0.5)
    return await memory_mailbox(node)


def spooled(pi: Node) -> int:
    """Copies the Pi holds for devices, not yet acknowledged."""
    assert pi.inbox is not None
    row = pi.inbox.store.db.one("SELECT COUNT(*) AS n FROM spool")
    assert row is not None
    return int(row["n"])


def mail_bytes(frm: Address, to: Address, subject: str) -> bytes:
    from email.message import EmailMessage

    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = str(frm), str(to), subject
    m["Message-ID"] = f"<{subject.replace(' ', '.')}@enrol.test>"
    m.set_content(subject)
    return m.as_bytes()


async def test_code_misuse_gets_clear_errors(pi: tuple[Node, str], tmp_path: Path) -> None:
    p, onion = pi
    code, out = await acli(p.config.data_dir, "users", "invite", "bob", "--json")
    text = json.loads(out)["code"]
    home = tmp_path / "new"
    write_config(home, tor_off({onion: p.api_port}))
    # a typing mistake is caught before anything goes over the network
    wrong = text[:-3] + ("a" if text[-3] != "a" else "b") + text[-2:]
    code, out = await acli(home, "init", "--invite", wrong)
    assert code == 1 and "typing mistake" in out
    code, out = await acli(home, "init", "--invite", text[:-10])
    assert code == 1 and "characters" in out
    code, out = await acli(home, "init", "--join", text)
    assert code == 1 and "--invite" in out
    # a well-formed code the inbox never issued; then the limit on wrong codes
    fake = Code.generate("invite", Address.parse(f"x@{onion}.onion").onion_public_key)
    code, out = await acli(home, "init", "--invite", fake.text())
    assert code == 1 and "no such invite" in out
    fake_pair = Code.generate("pairing", fake.onion_pk)
    code, out = await acli(home, "init", "--join", fake_pair.text())
    assert code == 1 and "no such pairing code" in out
    assert not (home / "users").exists()
    # an expired invite
    code, out = await acli(p.config.data_dir, "users", "invite", "carol", "--json")
    assert p.enrolment is not None
    for row in p.enrolment.store.open_invites(0):
        p.enrolment.store.db.execute(
            "UPDATE invites SET expires_at = 1 WHERE claim_hash = ?", (row.claim_hash,)
        )
    code, out = await acli(home, "init", "--invite", json.loads(out)["code"])
    assert code == 1 and "expired" in out
    # a data directory that is already set up is never touched
    code, out = await acli(home, "init", "--user", "zed")
    assert code == 0
    code, out = await acli(home, "init", "--invite", text)
    assert code == 1 and "already set up" in out


async def test_wrong_codes_are_rate_limited_and_logged(
    pi: tuple[Node, str], caplog: pytest.LogCaptureFixture
) -> None:
    p, _ = pi
    assert p.enrolment is not None
    now = p.clock.now()
    limit = p.config.inbox.code_failures_per_hour
    for _ in range(limit):
        with pytest.raises(CodeRefused):
            p.enrolment.invite_info(b"\x00" * 32, now)
    code, _ = p.enrolment.create_invite("dora", now=now)
    # past the limit even the right code waits for the next hour: guessing stops here
    from onionpost.core.errors import TooManyCodeAttempts

    with pytest.raises(TooManyCodeAttempts):
        p.enrolment.invite_info(code.claim(), now)
    assert p.enrolment.invite_info(code.claim(), now + 3600).local == "dora"
    assert sum("tried an unknown invite code" in r.message for r in caplog.records) == limit


async def test_a_pairing_with_the_wrong_secret_changes_nothing(
    pi: tuple[Node, str], tmp_path: Path
) -> None:
    """Someone who knows the slot (the inbox itself, say) but not the code cannot join."""
    p, onion = pi
    code, out = await acli(p.config.data_dir, "users", "invite", "erin", "--json")
    home = tmp_path / "erin"
    write_config(home, tor_off({onion: p.api_port}))
    code, out = await acli(home, "init", "--invite", json.loads(out)["code"])
    assert code == 0, out
    config: Config = load(home)
    files = AccountFiles(KeyStore(home))
    shown: asyncio.Queue[Code] = asyncio.Queue()

    async def offer() -> object:
        async with inbox_dialer(config, say=print) as dialer:
            return await offer_pairing(
                files.load("erin"),
                config,
                dialer=dialer,
                say=print,
                show_code=lambda c, _: shown.put_nowait(c),
                clock=SystemClock(),
                save=files.save,
            )

    async def impostor() -> None:
        real = await shown.get()
        forged = Code("pairing", real.onion_pk, bytes(10))  # right slot, wrong secret
        object.__setattr__(forged, "slot", real.slot)
        async with inbox_dialer(config, say=print) as dialer:
            with pytest.raises(PairingFailed):
                await join_identity(
                    config,
                    forged,
                    device_name="evil",
                    with_identity=True,
                    dialer=dialer,
                    say=print,
                    clock=SystemClock(),
                )

    results = await asyncio.gather(offer(), impostor(), return_exceptions=True)
    assert isinstance(results[0], PairingFailed), results
    assert results[1] is None, results
    assert files.load("erin").device_list.version == 1


async def test_two_people_invited_to_one_inbox_both_write_to_the_same_person(
    pi: tuple[Node, str], tmp_path: Path
) -> None:
    """A household on one Pi: each person's replies reach that person, no bounce."""
    p, onion = pi
    h_home = tmp_path / "h"
    h_port = free_port()
    write_config(h_home, tor_off({onion: p.api_port}, f"listen_port = {h_port}\n"))
    initialize(load(h_home), local="harry", device_name="desk", now=int(SystemClock().now()))
    h_onion = AccountFiles(KeyStore(h_home)).load("harry").address.onion
    p.dialer.routes[h_onion] = f"127.0.0.1:{h_port}"
    nodes: dict[str, Node] = {}
    for person in ("ann", "ben"):
        _, out = await acli(p.config.data_dir, "users", "invite", person, "--json")
        home = tmp_path / person
        write_config(home, tor_off({onion: p.api_port, h_onion: h_port}))
        code, out = await acli(home, "init", "--invite", json.loads(out)["code"])
        assert code == 0, out
        nodes[person] = Node(load(home), clock=SystemClock(), extensions=(memory_mailbox,))
    harry = Node(load(h_home), clock=SystemClock(), extensions=(memory_mailbox,))
    for node in (harry, *nodes.values()):
        await node.start()
    try:
        hl = harry.devices["harry"].address
        assert harry.submissions is not None
        for person, node in nodes.items():
            me = node.devices[person].address
            assert node.submissions is not None
            node.submissions.submit(person, [hl], mail_bytes(me, hl, f"hello from {person}"))
        await eventually(
            lambda: {"hello from ann", "hello from ben"} <= set(subjects(harry, "harry")),
            "both at harry",
        )
        for person, node in nodes.items():
            me = node.devices[person].address
            harry.submissions.submit("harry", [me], mail_bytes(hl, me, f"reply to {person}"))
        for person, node in nodes.items():
            await eventually(
                lambda n=node, who=person: f"reply to {who}" in subjects(n, who),  # type: ignore[misc]
                f"harry's reply at {person}",
            )
        assert not any("Undeliver" in s or "failure" in s.lower() for s in subjects(harry, "harry"))
        assert p.inbox is not None and len(p.inbox.store.mailboxes()) == 2
        code, out = await acli(p.config.data_dir, "users", "list")
        assert code == 0 and f"ann@{onion}.onion" in out and f"ben@{onion}.onion" in out
    finally:
        for node in (harry, *nodes.values()):
            await node.stop()
