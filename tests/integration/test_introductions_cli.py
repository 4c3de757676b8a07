"""`onionpost contacts introduce` and `accept-intro` as a person types them (click's runner,
a real data directory with its own inbox; no node runs, so nothing leaves the machine).

The delivery and the effect at the other inboxes are tested end to end in
test_introductions.py; this checks the commands' words, refusals and what they store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from onionpost.app.cli import cli
from onionpost.core.address import Address
from onionpost.core.crypto.envelope import CONTENT_INTRODUCTION
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.crypto.keys import ServerSecrets
from onionpost.core.crypto.primitives import kdf, mac32, system_random
from onionpost.inbox.postoffice import CTX_TOKEN_HASH
from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
from onionpost.store.contacts import ContactStore
from onionpost.store.db import Database
from onionpost.store.inbox import InboxStore
from onionpost.store.introductions import IntroductionStore
from onionpost.store.keystore import KeyStore


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    return result.exit_code, result.output


def someone(name: str) -> str:
    return str(Address.for_key(name, ServerSecrets.generate(0).onion_pk))


def test_introduce_queues_one_introduction_for_each(home: Path) -> None:
    run(home, "init", "--user", "alice")
    bob, carol, dave = someone("bob"), someone("carol"), someone("dave")
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    contacts = ContactStore(db, "alice")
    for who in (bob, carol):
        contacts.remember(who, uik_pk=system_random(32), pin=b"p" * 32, now=1)
    db.close()

    code, out = run(home, "contacts", "introduce", bob, dave)
    assert code == 1 and "not among your contacts" in out and "Traceback" not in out
    code, out = run(home, "contacts", "introduce", bob, bob)
    assert code == 1 and "two different people" in out
    code, out = run(home, "contacts", "introduce", bob, "nobody@example.com")
    assert code == 1 and "Traceback" not in out

    code, out = run(home, "contacts", "introduce", bob, carol)
    assert code == 0 and "Queued an introduction for each of them (s1, s2)" in out, out
    code, out = run(home, "queue")
    assert "s1" in out and "s2" in out
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    rows = db.all("SELECT id, content_type, headers FROM submissions ORDER BY id")
    assert [r["content_type"] for r in rows] == [CONTENT_INTRODUCTION] * 2
    assert f"Introduction of {carol} to {bob}".encode() in rows[0]["headers"]
    # no Sent copy: nothing a mail client could show
    assert db.scalar("SELECT count(*) FROM filing_queue") == 0
    db.close()


def test_accept_intro_pins_and_registers_the_token(home: Path) -> None:
    run(home, "init", "--user", "alice")
    bob, carol = someone("bob"), someone("carol")
    code, out = run(home, "contacts", "accept-intro", carol)
    assert code == 1 and "No introduction of" in out, out

    carol_uik, admit, present = system_random(32), system_random(32), system_random(32)
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    IntroductionStore(db, "alice").add(
        introducer=bob,
        address=carol,
        uik_pk=carol_uik,
        admit_token=admit,
        present_token=present,
        now=1,
        expires_at=4_000_000_000,
    )
    db.close()
    code, out = run(home, "contacts")
    assert f"Introduced by {bob}: {carol}" in out and "accept-intro" in out
    code, out = run(home, "contacts", "accept-intro", carol)
    assert code == 0, out
    assert f"Accepted {carol}, introduced by {bob}" in out
    assert "Introduced by" not in run(home, "contacts")[1]
    assert fingerprint(carol_uik) in out
    assert "could not be reached" in out  # no node runs: the key is compared on first fetch

    db = Database(home / "device.db", DEVICE_COMPONENTS)
    contact = ContactStore(db, "alice").get(carol)
    assert contact is not None and contact.uik_pk == carol_uik
    assert contact.token_from_them == admit
    db.close()
    servers = KeyStore(home).load_server()
    idb = Database(home / "inbox.db", INBOX_COMPONENTS, record_key=servers.record_key())
    (mb,) = InboxStore(idb).mailboxes()
    token_hash = mac32(kdf(servers.onion_seed, CTX_TOKEN_HASH), admit)
    assert InboxStore(idb).token_valid(mb.mailbox_id, token_hash)
    idb.close()
    code, out = run(home, "contacts", "accept-intro", carol)
    assert code == 1 and "No introduction" in out  # accepted once

    # blocking carol withdraws the introduction's token at the inbox
    code, out = run(home, "contacts", "block", carol)
    assert code == 0, out
    idb = Database(home / "inbox.db", INBOX_COMPONENTS, record_key=servers.record_key())
    assert not InboxStore(idb).token_valid(mb.mailbox_id, token_hash)
    idb.close()


def test_accept_intro_refuses_a_key_other_than_the_pinned_one(home: Path) -> None:
    run(home, "init", "--user", "alice")
    bob, carol = someone("bob"), someone("carol")
    pinned, introduced = system_random(32), system_random(32)
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    ContactStore(db, "alice").remember(carol, uik_pk=pinned, pin=b"p" * 32, now=1)
    IntroductionStore(db, "alice").add(
        introducer=bob,
        address=carol,
        uik_pk=introduced,
        admit_token=system_random(32),
        present_token=system_random(32),
        now=1,
        expires_at=4_000_000_000,
    )
    db.close()
    code, out = run(home, "contacts", "accept-intro", carol)
    assert code != 0 and "REFUSED" in out and "Traceback" not in out, out
    assert fingerprint(pinned) in out and fingerprint(introduced) in out
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    contact = ContactStore(db, "alice").get(carol)
    assert contact is not None and contact.uik_pk == pinned and contact.token_from_them is None
    db.close()
