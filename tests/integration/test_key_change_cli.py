"""`onionpost contacts` for key changes, as a person types it: show both keys side by side,
accept-key only with the right fingerprint, reject-key, and the QR code of one's own key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from onionpost.app.cli import cli
from onionpost.core.address import Address
from onionpost.core.crypto.bundle import Pin
from onionpost.core.crypto.fingerprint import fingerprint, safety_number
from onionpost.core.crypto.keys import ServerSecrets
from onionpost.core.crypto.primitives import ed25519_public
from onionpost.core.crypto.sender import pin_encode
from onionpost.core.trust import scan_payload
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.contacts import ContactStore
from onionpost.store.db import Database
from onionpost.store.keystore import AccountFiles, KeyStore

HAL = str(Address.for_key("hal", ServerSecrets.generate(0).onion_pk))
OLD = ed25519_public(b"\x11" * 32)
NEW = ed25519_public(b"\x22" * 32)


def run(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    return result.exit_code, result.output


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    code, out = run(home, "init", "--user", "alice", "--device-name", "laptop")
    assert code == 0, out
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    store = ContactStore(db, "alice")
    store.remember(HAL, uik_pk=OLD, pin=pin_encode(Pin(OLD, 1, bytes(32), {})), now=1)
    db.close()
    return home


def _change(home: Path) -> None:
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    ContactStore(db, "alice").record_identity_change(
        HAL, OLD, NEW, 2, new_pin=pin_encode(Pin(NEW, 1, bytes(32), {})), held=True
    )
    db.close()


def _my_uik(home: Path) -> bytes:
    files = AccountFiles(KeyStore(home))
    return files.load("alice").uik_pk


def test_show_and_accept_key(home: Path) -> None:
    code, out = run(home, "contacts", "show", HAL)
    assert code == 0 and fingerprint(OLD) in out and "KEY CHANGE" not in out
    _change(home)

    code, out = run(home, "contacts")
    assert code == 0 and "DIFFERENT identity key" in out and "accept-key" in out
    assert "contacts trust" not in out

    code, out = run(home, "contacts", "show", HAL)
    assert code == 0, out
    assert "KEY CHANGE" in out and "1 message(s) in Quarantine" in out
    row = next(line for line in out.splitlines() if line.startswith("identity:"))
    assert row.index(fingerprint(OLD)) < row.index(fingerprint(NEW))  # side by side
    me = _my_uik(home)
    old_sn, new_sn = safety_number(me, OLD).split(), safety_number(me, NEW).split()
    first = next(line for line in out.splitlines() if line.startswith("safety number:"))
    assert " ".join(old_sn[:4]) in first and " ".join(new_sn[:4]) in first
    assert " ".join(new_sn[8:]) in out

    code, out = run(home, "contacts", "accept-key", HAL, fingerprint(OLD))
    assert code == 1 and "does NOT match" in out and "Traceback" not in out
    code, out = run(home, "contacts", "accept-key", HAL, "hello")
    assert code == 1 and "is not a fingerprint" in out
    assert fingerprint(OLD) in run(home, "contacts")[1]  # nothing changed

    # typed as read aloud, in groups, without quotes
    code, out = run(home, "contacts", "accept-key", HAL, *fingerprint(NEW).upper().split("-"))
    assert code == 0, out
    assert "pinned" in out and "1 message(s)" in out and "Quarantine" in out
    code, out = run(home, "contacts", "show", HAL)
    assert fingerprint(NEW) in out and fingerprint(OLD) not in out and "KEY CHANGE" not in out
    code, out = run(home, "contacts", "accept-key", HAL, fingerprint(NEW))
    assert code == 1 and "no identity key change" in out


def test_reject_key(home: Path) -> None:
    code, out = run(home, "contacts", "reject-key", HAL)
    assert code == 1 and "no identity key change" in out
    _change(home)
    code, out = run(home, "contacts", "reject-key", HAL)
    assert code == 0 and "kept" in out and "1 message(s)" in out
    code, out = run(home, "contacts", "show", HAL)
    assert fingerprint(OLD) in out and fingerprint(NEW) not in out
    assert "DIFFERENT" not in run(home, "contacts")[1]


def test_me_qr_and_verify_scan(home: Path) -> None:
    code, out = run(home, "contacts", "me", "--qr")
    assert code == 0, out
    me = _my_uik(home)
    assert fingerprint(me) in out and "█" in out
    payload = next(line for line in out.splitlines() if line.startswith("onionpost:"))
    assert payload.endswith("#" + fingerprint(me)) and "alice@" in payload
    code, out = run(home, "contacts", "me")
    assert code == 0 and "█" not in out and fingerprint(me) in out

    hal = Address.parse(HAL)
    # a code for someone else, or of another key: loud, and nothing is marked
    for wrong, words in (
        (payload, "not " + HAL),
        (scan_payload(hal, NEW), "does NOT match"),
        ("onionpost:" + HAL, "no fingerprint"),
        ("https://example.org", "not an onionpost contact code"),
    ):
        code, out = run(home, "contacts", "verify", HAL, "--scan", wrong)
        assert code == 1 and words in out and "Traceback" not in out, (wrong, out)
    assert "verified" not in run(home, "contacts")[1]

    _change(home)
    code, out = run(home, "contacts", "verify", HAL, "--scan", scan_payload(hal, NEW))
    assert code == 1 and "NEW identity key" in out

    # as scanned: surrounding spaces, and upper case (what a scanner app may hand over)
    scanned = " " + scan_payload(hal, OLD).upper() + "\n"
    code, out = run(home, "contacts", "verify", HAL, "--scan", scanned)
    assert code == 0 and "matches the pinned key" in out
    assert "verified" in run(home, "contacts")[1]


def test_status_names_a_pending_key_change(home: Path) -> None:
    (home / "run").mkdir(exist_ok=True)
    (home / "run" / "status.json").write_text('{"pid": 0, "updated_at": 0, "users": []}')
    code, out = run(home, "status")
    assert code == 0 and "NEW identity key" not in out, out
    _change(home)
    code, out = run(home, "status")
    assert code == 0, out
    assert f"{HAL} presents a NEW identity key; 1 message(s) held in Quarantine" in out
    assert f"onionpost contacts show {HAL}" in out
    code, out = run(home, "status", "--json")
    assert code == 0 and '"key_changes"' in out and HAL in out
    assert run(home, "contacts", "accept-key", HAL, fingerprint(NEW))[0] == 0
    assert "NEW identity key" not in run(home, "status")[1]
