"""`onionpost backup` while the node runs, `onionpost restore` on a fresh data directory:
the same address, the old mail, and new mail arriving there."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gateway.service import start_gateway
from onionpost.app.node import Node
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load
from onionpost.store.keystore import AccountFiles, KeyStore
from onionpost.testing.mailstore import memory_mailbox

from .test_enrolment import acli, eventually, free_port, mail_bytes, subjects, tor_off, write_config

GATEWAY = "[gateway]\nsmtp_port = 0\nimap_port = 0\nautoconfig_port = 0\n"

#: The folders of a Maildir that hold messages.
MAILDIR = ("cur", "new")


async def test_backup_while_running_then_restore_elsewhere(mail_tmp: Path) -> None:
    tmp_path = mail_tmp
    a_home, b_home = tmp_path / "alice", tmp_path / "bob"
    a_port, b_port = free_port(), free_port()
    now = int(SystemClock().now())
    write_config(a_home, tor_off({}, f"listen_port = {a_port}\n"))
    write_config(b_home, tor_off({}, f"listen_port = {b_port}\n"))
    initialize(load(a_home), local="alice", device_name="pi", now=now)
    initialize(load(b_home), local="bob", device_name="desk", now=now)
    a_onion = AccountFiles(KeyStore(a_home)).load("alice").address.onion
    b_onion = AccountFiles(KeyStore(b_home)).load("bob").address.onion
    write_config(a_home, tor_off({b_onion: b_port}, f"listen_port = {a_port}\n") + GATEWAY)
    write_config(b_home, tor_off({a_onion: a_port}, f"listen_port = {b_port}\n"))
    secret = tmp_path / "passphrase"
    secret.write_text("a long backup passphrase\n")
    target = tmp_path / "alice.backup"

    # alice's mail is in her Dovecot: the backup must carry the Maildir
    alice = Node(load(a_home), extensions=(start_gateway,))
    bob = Node(load(b_home), extensions=(memory_mailbox,))
    await alice.start()
    await bob.start()
    try:
        me, other = alice.devices["alice"].address, bob.devices["bob"].address
        assert bob.submissions is not None
        bob.submissions.submit("bob", [me], mail_bytes(other, me, "before the backup"))
        await eventually(lambda: "before the backup" in subjects(alice, "alice"), "first mail")
        # A message's file time is its received date; make it one a restore could not fake.
        received = 1_600_000_000
        messages = [
            p for p in (a_home / "mail").rglob("*") if p.is_file() and p.parent.name in MAILDIR
        ]
        assert messages
        for p in messages:
            os.utime(p, (received, received))
        code, out = await acli(a_home, "backup", str(target), "--passphrase-file", str(secret))
        assert code == 0, out
        assert target.stat().st_mode & 0o077 == 0
        assert b"before the backup" not in target.read_bytes()
    finally:
        await alice.stop()

    # the SD card dies; a new machine gets the backup
    new_home = tmp_path / "new-pi"
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase")
    code, out = await acli(new_home, "restore", str(target), "--passphrase-file", str(wrong))
    assert code == 1 and "passphrase does not open" in out
    code, out = await acli(new_home, "restore", str(target), "--passphrase-file", str(secret))
    assert code == 0, out
    assert str(me) in out
    code, out = await acli(new_home, "restore", str(target), "--passphrase-file", str(secret))
    assert code == 1 and "already holds" in out
    marker = new_home / "dovecot" / "resync-needed"
    assert marker.exists()  # the Maildirs were copied while Dovecot ran: reread them all
    restored = Node(load(new_home), extensions=(start_gateway,))
    await restored.start()
    assert not marker.exists()
    try:
        assert restored.devices["alice"].address == me
        assert "before the backup" in subjects(restored, "alice")
        restored_files = {
            p.name.split(":")[0]: p
            for p in (new_home / "mail").rglob("*")
            if p.is_file() and p.parent.name in MAILDIR
        }
        for p in messages:  # Dovecot may have moved it from new/ to cur/ since
            again = restored_files[p.name.split(":")[0]]
            assert again.stat().st_mtime == received, again  # the day it came, not today
        bob.submissions.submit("bob", [me], mail_bytes(other, me, "after the restore"))
        bob.wake()
        await eventually(lambda: "after the restore" in subjects(restored, "alice"), "new mail")
        await asyncio.sleep(0)
    finally:
        await restored.stop()
        await bob.stop()
