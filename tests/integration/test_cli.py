"""The `onionpost` command as a person uses it (click's runner; real data directories)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from onionpost.cli import cli


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
    carol = next(ln for ln in run(home, "users", "list")[1].splitlines() if ln.startswith("carol@"))
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
