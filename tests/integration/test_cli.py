"""The `onionpost` command as a person uses it (click's runner; real data directories)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from onionpost.app.cli import cli
from onionpost.core.address import Address
from onionpost.core.crypto.keys import ServerSecrets


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def run(home: Path, *args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args], input=input)
    return result.exit_code, result.output


def test_help_and_version() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0 and "onion service" in result.output
    for command in (
        "init",
        "run",
        "status",
        "queue",
        "send",
        "contacts",
        "devices",
        "users",
        "password",
        "thunderbird",
        "read",
        "search",
    ):
        assert command in result.output
    assert "0.1.0" in CliRunner().invoke(cli, ["--version"]).output


def test_init_creates_private_keys_and_refuses_to_run_twice(home: Path) -> None:
    code, out = run(home, "init", "--user", "alice")
    assert code == 0, out
    assert "alice@" in out and ".onion" in out and "password:" in out
    modes = {
        p.relative_to(home).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in home.rglob("*")
    }
    public = {"tls/ca.pem", "tls/cert.pem"}  # certificates; their keys are 0600
    for path, mode in modes.items():
        expected = 0o700 if (home / path).is_dir() else 0o644 if path in public else 0o600
        assert mode == expected, f"{path} has mode {oct(mode)}"
    before = (home / "users" / "alice" / "identity.key").read_bytes()
    code, out = run(home, "init", "--user", "alice")
    assert code == 1 and "refusing to overwrite" in out and "Traceback" not in out
    assert (home / "users" / "alice" / "identity.key").read_bytes() == before
    assert run(home, "init", "--if-missing")[0] == 0


def test_users_send_queue_cancel(home: Path) -> None:
    run(home, "init", "--user", "alice")
    code, out = run(home, "users", "add", "carol")
    assert code == 0 and "carol@" in out and "password" in out, out
    code, out = run(home, "users", "list")
    assert out.count("@") == 2
    code, out = run(home, "send", "--user", "alice", "--to", "nobody@example.com", "--text", "x")
    assert code == 1 and "not an onionpost address" in out
    carol = _address(home, "carol")
    code, out = run(
        home, "send", "--user", "alice", "--to", carol, "--subject", "hi", "--text", "hello carol"
    )
    assert code == 0 and "Queued as s1" in out, out
    code, out = run(home, "queue")
    assert "s1" in out and "carol@" in out and "waiting for keys" in out
    assert run(home, "queue", "retry", "s1")[0] == 0
    code, out = run(home, "queue", "cancel", "s1")
    assert code == 0 and "withdrawn" in out
    code, out = run(home, "queue")
    # withdrawn is not delivered: the listing says which
    assert "Nothing is waiting" in out and "1 cancelled" in out and " delivered," not in out
    code, out = run(home, "queue", "cancel", "bogus")
    assert code == 1 and "not a queue id" in out


def test_devices_contacts_password_thunderbird(home: Path, tmp_path: Path) -> None:
    run(home, "init", "--user", "alice", "--device-name", "laptop")
    code, out = run(home, "devices")
    assert "laptop" in out and "<- this device" in out and "version 1" in out
    code, out = run(home, "devices", "revoke", "laptop")
    assert code == 1 and "cannot revoke itself" in out
    assert "No contacts yet" in run(home, "contacts")[1]
    code, out = run(home, "contacts", "show", "bob@" + "a" * 56 + ".onion")
    assert code == 1 and "Traceback" not in out
    code, out = run(home, "password", "--generate")
    assert code == 0 and "New password for alice" in out
    code, out = run(home, "password", input="secret pass\nsecret pass\n")
    assert code == 0 and "Password changed" in out
    target = tmp_path / "tb"
    code, out = run(home, "thunderbird", "--write", str(target))
    assert code == 0 and "127.0.0.1" in out and "1143" in out and "1587" in out
    assert (target / "user.js").exists() and (target / "onionpost-ca.pem").exists()
    policy = json.loads((target / "policies.json").read_text())
    assert str((target / "onionpost-ca.pem").resolve()) in json.dumps(policy)


def test_status_without_a_running_node_says_so(home: Path) -> None:
    run(home, "init", "--user", "alice")
    code, out = run(home, "status")
    assert code == 1 and "not running" in out and "onionpost run" in out


def test_commands_before_init_say_what_to_do(home: Path) -> None:
    for args in (("address",), ("queue",), ("devices",), ("status",)):
        code, out = run(home, *args)
        assert code == 1, args
        assert ("onionpost init" in out) or ("onionpost run" in out), out
        assert "Traceback" not in out


def _hal() -> str:
    """Somebody on another inbox."""
    return str(Address.for_key("hal", ServerSecrets.generate(0).onion_pk))


def _ids(out: str) -> list[str]:
    """The IDs of `onionpost queue` (the addresses may contain "s1" too)."""
    return [ln.split()[0] for ln in out.splitlines()[1:] if ln[:1] in ("s", "o")]


def _address(home: Path, user: str) -> str:
    lines = run(home, "users", "list")[1].splitlines()
    return next(ln.split()[0] for ln in lines if ln.startswith(f"{user}@"))


def test_several_users_say_whose_contacts_and_devices(home: Path) -> None:
    from onionpost.store import DEVICE_COMPONENTS
    from onionpost.store.contacts import ContactStore
    from onionpost.store.db import Database

    run(home, "init", "--user", "alice", "--device-name", "laptop")
    run(home, "users", "add", "carol", "--device-name", "tablet")
    hal = _hal()
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    ContactStore(db, "alice").remember(hal, uik_pk=b"u" * 32, pin=b"p" * 32, now=1)
    db.close()

    for args in (("contacts",), ("contacts", "verify", hal), ("devices",)):
        code, out = run(home, *args)
        assert code == 1 and "Say which user with --user (alice, carol)" in out, args
    assert hal in run(home, "contacts", "--user", "alice")[1]
    assert "No contacts yet" in run(home, "contacts", "--user", "carol")[1]
    code, out = run(home, "contacts", "show", hal, "--user", "alice")
    assert code == 0 and "safety number" in out
    code, out = run(home, "contacts", "--user", "carol", "show", hal)  # the group's --user
    assert code == 1 and "not among your contacts" in out
    code, out = run(home, "contacts", "verify", hal, "--user", "alice")
    assert code == 0 and "verified" in out
    assert "verified" in run(home, "contacts", "--user", "alice")[1]
    code, out = run(home, "contacts", "block", hal, "--user", "carol")
    assert code == 1 and "not among your contacts" in out
    code, out = run(home, "contacts", "trust", hal, "--user", "alice")
    assert code == 1 and "accept-key" in out  # trust pinned whatever came next: gone
    code, out = run(
        home, "contacts", "accept-key", hal, "abcd-efgh-ijkl-mnop-qrst", "--user", "alice"
    )
    assert code == 1 and "no identity key change" in out
    code, out = run(home, "contacts", "--user", "nobody")
    assert code == 1 and "no user 'nobody'" in out

    code, out = run(home, "devices", "--user", "carol")
    assert code == 0 and "tablet" in out and "laptop" not in out
    code, out = run(home, "devices", "revoke", "tablet", "--user", "carol")
    assert code == 1 and "cannot revoke itself" in out
    code, out = run(home, "devices", "--user", "alice", "revoke", "tablet")
    assert code == 1 and "matches 0 devices" in out  # alice has no tablet


def test_queue_per_user(home: Path) -> None:
    run(home, "init", "--user", "alice")
    run(home, "users", "add", "carol")
    alice, carol = _address(home, "alice"), _address(home, "carol")
    assert "Queued as s1" in run(home, "send", "--user", "alice", "--to", carol, "--text", "a")[1]
    assert "Queued as s2" in run(home, "send", "--user", "carol", "--to", alice, "--text", "c")[1]
    code, out = run(home, "queue")
    assert code == 0 and "USER" in out
    assert any(ln.startswith("s1") and " alice " in ln for ln in out.splitlines())
    assert any(ln.startswith("s2") and " carol " in ln for ln in out.splitlines())
    code, out = run(home, "queue", "--user", "alice")
    assert code == 0 and _ids(out) == ["s1"] and "USER" not in out
    code, out = run(home, "queue", "--user", "nobody")
    assert code == 1 and "no user 'nobody'" in out
    code, out = run(home, "queue", "cancel", "s2", "--user", "alice")
    assert code == 1 and "not waiting in alice's queue" in out
    code, out = run(home, "queue", "retry", "s2", "--user", "alice")
    assert code == 1 and "Nothing to retry" in out
    code, out = run(home, "queue", "--user", "carol", "retry")
    assert code == 0 and out.startswith("1 queued")
    code, out = run(home, "queue", "cancel", "s2", "--user", "carol")
    assert code == 0 and "withdrawn" in out
    assert _ids(run(home, "queue")[1]) == ["s1"]


def test_queue_retry_of_an_outbox_row_makes_its_sender_ask_about_it_at_once(home: Path) -> None:
    """`queue retry o<id>` makes the outbox row due, and the sender's handed-over recipient
    too: its next outcome check asks the inbox about the row, not only at the next attempt
    time it last learnt."""
    from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
    from onionpost.store.db import Database
    from onionpost.store.submissions import SubmissionStore

    run(home, "init", "--user", "alice")
    run(home, "users", "add", "carol")
    carol = _address(home, "carol")
    assert "Queued as s1" in run(home, "send", "--user", "alice", "--to", carol, "--text", "a")[1]
    later = 4_000_000_000
    inbox = Database(home / "inbox.db", INBOX_COMPONENTS)
    with inbox.transaction() as c:
        row = c.execute(
            "INSERT INTO outbox (mailbox_id, device_id, onion, submission_hash, created_at,"
            " expires_at, next_attempt_at) VALUES (x'00', x'00', ?, x'01', 0, ?, ?)",
            (Address.parse(carol).onion, later + 1, later),
        ).lastrowid
    inbox.close()
    assert row is not None
    device = Database(home / "device.db", DEVICE_COMPONENTS)
    store = SubmissionStore(device)
    store.mark_queued(1, carol, row)
    store.set_progress(
        submission_id=1,
        address=carol,
        attempts=3,
        error="away",
        code="4.4.1",
        next_attempt_at=later,
    )
    code, out = run(home, "queue", "retry", f"o{row}")
    assert code == 0, out
    (handed,) = store.handed_over("alice")
    assert handed.outbox_id == row and handed.next_attempt_at < later
    device.close()


def test_users_list_shows_what_each_mailbox_uses(home: Path) -> None:
    from onionpost.store import INBOX_COMPONENTS
    from onionpost.store.db import Database

    run(home, "init", "--user", "alice")
    run(home, "users", "add", "carol")
    # two messages of 1000 and 3000 bytes wait at the inbox for alice's devices
    db = Database(home / "inbox.db", INBOX_COMPONENTS)
    mailbox_id = db.scalar("SELECT mailbox_id FROM mailboxes WHERE local = 'alice'")
    with db.transaction() as c:
        for n, size in ((1, 1000), (2, 3000)):
            c.execute(
                "INSERT INTO sealed (mailbox_id, digest, size, received_at, expires_at, data)"
                " VALUES (?, ?, ?, 0, 9999999999, x'00')",
                (mailbox_id, bytes([n]) * 32, size),
            )
        c.execute("UPDATE mailboxes SET quota_bytes = 10485760 WHERE local = 'carol'")
    db.close()
    code, out = run(home, "users", "list")
    assert code == 0, out
    header, *rows = out.splitlines()
    assert header.split() == ["ADDRESS", "MAIL", "SPOOLED", "DEVICES", "QUOTA"]
    alice = next(r.split() for r in rows if r.startswith("alice@"))
    carol = next(r.split() for r in rows if r.startswith("carol@"))
    assert alice[1:] == ["2", "3.9", "KiB", "1", "2.0", "GiB"]
    assert carol[1:] == ["0", "0", "B", "1", "10.0", "MiB"]


def test_users_remove(home: Path) -> None:
    from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
    from onionpost.store.accounts import AccountStore
    from onionpost.store.contacts import ContactStore
    from onionpost.store.db import Database

    run(home, "init", "--user", "alice")
    run(home, "users", "add", "carol")
    alice, carol = _address(home, "alice"), _address(home, "carol")
    run(home, "send", "--user", "carol", "--to", alice, "--text", "from carol")
    run(home, "send", "--user", "alice", "--to", carol, "--text", "from alice")
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    for user in ("alice", "carol"):
        ContactStore(db, user).remember(_hal(), uik_pk=b"u", pin=b"p", now=1)
    db.close()

    code, out = run(home, "users", "remove", "bob", "--yes")
    assert code == 1 and "There is no user 'bob' here (alice, carol)" in out
    code, out = run(home, "users", "remove", "carol", input="n\n")
    assert code == 1 and "Aborted" in out
    assert (home / "users" / "carol").exists()
    code, out = run(home, "users", "remove", "carol", input="y\n")
    assert code == 0 and "Removed carol" in out and "1 contact(s)" in out, out
    assert not (home / "users" / "carol").exists()
    assert [ln.split()[0] for ln in run(home, "users", "list")[1].splitlines()[1:]] == [alice]

    db = Database(home / "device.db", DEVICE_COMPONENTS)
    assert db.scalar("SELECT count(*) FROM filing_queue WHERE user = 'carol'") == 0
    assert AccountStore(db).users() == ["alice"]
    assert ContactStore(db, "carol").all() == [] and len(ContactStore(db, "alice").all()) == 1
    assert db.scalar("SELECT count(*) FROM submissions WHERE user = 'carol'") == 0
    db.close()
    db = Database(home / "inbox.db", INBOX_COMPONENTS)
    assert [r[0] for r in db.all("SELECT local FROM mailboxes")] == ["alice"]
    db.close()
    # alice's mail to carol waits (and will bounce)
    assert _ids(run(home, "queue")[1]) == ["s2"]

    code, out = run(home, "users", "remove", "carol", "--yes")
    assert code == 1 and "There is no user 'carol' here (alice)" in out
    code, out = run(home, "users", "remove", "alice", "--yes")
    assert code == 0 and "Removed alice" in out
    code, out = run(home, "users", "list")
    assert code == 0 and "Nobody has an address here" in out


def test_an_interrupted_removal_is_finished_by_running_it_again(home: Path) -> None:
    from onionpost.store import INBOX_COMPONENTS
    from onionpost.store.db import Database
    from onionpost.store.inbox import InboxStore

    run(home, "init", "--user", "alice")
    run(home, "users", "add", "carol")
    db = Database(home / "inbox.db", INBOX_COMPONENTS)
    store = InboxStore(db)
    carol = store.mailbox_by_local("carol")
    assert carol is not None
    store.remove_mailbox(carol.mailbox_id)  # the removal stopped after the inbox's part
    db.close()
    rows = run(home, "users", "list")[1].splitlines()
    assert next(r.split() for r in rows if r.startswith("carol@"))[1:] == ["-", "-", "1", "-"]
    code, out = run(home, "users", "remove", "carol", "--yes")
    assert code == 0 and "Removed carol" in out and "none was removed" in out, out
    assert not (home / "users" / "carol").exists()


def test_status_shows_each_persons_policy_on_a_shared_inbox(home: Path) -> None:
    import json
    import os

    run(home, "init", "--user", "alice")
    assert run(home, "users", "add", "carol")[0] == 0
    code, out = run(home, "contacts", "policy", "contacts-only", "--user", "alice")
    assert code == 0 and "contacts-only" in out, out
    (home / "run").mkdir(exist_ok=True)
    (home / "run" / "status.json").write_text(json.dumps({"pid": os.getpid(), "users": []}))
    code, out = run(home, "status", "--json")
    assert code == 0 and json.loads(out)["policies"] == {
        "alice": "contacts-only",
        "carol": "open",
    }, out
    out = run(home, "status")[1]
    assert "mail from:  alice: contacts-only" in out and "mail from:  carol: open" in out, out


def test_contacts_block_unblock_and_policy_on_a_machine_with_its_inbox(home: Path) -> None:
    import json
    import os

    from onionpost.store import DEVICE_COMPONENTS, INBOX_COMPONENTS
    from onionpost.store.contacts import ContactStore
    from onionpost.store.db import Database
    from onionpost.store.inbox import InboxStore
    from onionpost.store.keystore import KeyStore

    run(home, "init", "--user", "alice", "--device-name", "laptop")
    code, out = run(home, "contacts", "policy")
    assert code == 0 and "mail from:  open" in out, out
    code, out = run(home, "contacts", "policy", "contacts-only")
    assert code == 0 and "contacts-only" in out, out
    key = KeyStore(home).load_server().record_key()
    db = Database(home / "inbox.db", INBOX_COMPONENTS, record_key=key)
    (mb,) = InboxStore(db).mailboxes()
    assert mb.accepts_strangers is False
    db.close()
    # status shows it (from the inbox database; the node need not run)
    (home / "run").mkdir(exist_ok=True)
    (home / "run" / "status.json").write_text(json.dumps({"pid": os.getpid(), "users": []}))
    assert "mail from:  contacts-only" in run(home, "status")[1]
    code, out = run(home, "status", "--json")
    assert code == 0 and json.loads(out)["policies"] == {"alice": "contacts-only"}, out
    assert "mail from:  open" in run(home, "contacts", "policy", "open")[1]

    # block withdraws the token this device registered for the contact, at the local inbox
    hal = _hal()
    token = b"t" * 32
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    contacts = ContactStore(db, "alice")
    contacts.remember(hal, uik_pk=b"u" * 32, pin=b"p" * 32, now=1)
    contacts.set_token_from_them(hal, token)
    db.close()
    db = Database(home / "inbox.db", INBOX_COMPONENTS, record_key=key)
    from onionpost.core.crypto.primitives import kdf, mac32
    from onionpost.inbox.postoffice import CTX_TOKEN_HASH

    token_hash = mac32(kdf(KeyStore(home).load_server().onion_seed, CTX_TOKEN_HASH), token)
    InboxStore(db).add_token(mb.mailbox_id, token_hash, 1)
    db.close()
    code, out = run(home, "contacts", "block", hal)
    assert code == 0 and "is blocked" in out, out
    assert "blocked" in run(home, "contacts")[1]
    db = Database(home / "inbox.db", INBOX_COMPONENTS, record_key=key)
    assert not InboxStore(db).token_valid(mb.mailbox_id, token_hash)
    db.close()
    code, out = run(home, "contacts", "unblock", hal)
    assert code == 0 and "no longer blocked" in out, out
    assert "blocked" not in run(home, "contacts")[1]


def test_send_waits_while_the_disk_is_nearly_full(home: Path) -> None:
    """`onionpost send` keeps the disk's reserve as SMTP does, and says what to do."""
    run(home, "init", "--user", "alice")
    alice = _address(home, "alice")
    beyond = shutil.disk_usage(home).total // (1 << 20) + 1024  # more than this whole disk
    config = home / "onionpost.toml"
    original = config.read_text() if config.exists() else ""
    config.write_text(f"min_free_mib = {beyond}\n" + original)
    code, out = run(home, "send", "--user", "alice", "--to", alice, "--text", "room?")
    assert code == 1 and "disk is nearly full" in out and "Free disk space" in out, out
    assert "Traceback" not in out
    assert "s1" not in run(home, "queue")[1]  # nothing was queued
    config.write_text(original)
    code, out = run(home, "send", "--user", "alice", "--to", alice, "--text", "room?")
    assert code == 0 and "Queued as s1" in out, out
