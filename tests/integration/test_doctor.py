"""`onionpost doctor` names each problem and what to do about it."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load

from .test_enrolment import acli, free_port, tor_off, write_config


async def test_doctor_finds_loose_permissions_and_a_busy_port(tmp_path: Path) -> None:
    home = tmp_path / "node"
    smtp = free_port()
    write_config(
        home,
        tor_off({}, f"listen_port = {free_port()}\n")
        + f"[gateway]\nsmtp_port = {smtp}\nimap_port = {free_port()}\n"
        + f"autoconfig_port = {free_port()}\n",
    )
    code, out = await acli(home, "doctor")
    assert code == 1 and "holds no onionpost identity" in out and "onionpost init" in out
    initialize(load(home), local="alice", device_name="laptop", now=int(SystemClock().now()))
    code, out = await acli(home, "doctor")
    assert code == 0, out
    assert "Everything checked is fine" in out
    key = home / "users" / "alice" / "identity.key"
    key.chmod(0o644)
    with socket.socket() as other:
        other.bind(("127.0.0.1", smtp))
        other.listen()
        code, out = await acli(home, "doctor")
    assert code == 1
    assert "identity.key" in out and "chmod -R go-rwx" in out
    assert f"smtp {smtp}" in out and "choose other ports" in out
    assert "Traceback" not in out


async def test_doctor_says_when_dovecot_is_down(tmp_path: Path) -> None:
    """A running node whose Dovecot keeps dying: doctor names it and where to look."""
    home = tmp_path / "node"
    write_config(home, tor_off({}, f"listen_port = {free_port()}\n"))
    initialize(load(home), local="alice", device_name="laptop", now=int(SystemClock().now()))
    status = {
        "pid": os.getpid(),  # "the node": any live process will do for doctor
        "updated_at": time.time(),
        "gateway": {},
        "mail_server": {"status": "restarting (Dovecot exited with status 89)", "restarts": 3},
        "filing": 2,
    }
    (home / "run").mkdir(mode=0o700, exist_ok=True)
    (home / "run" / "status.json").write_text(json.dumps(status))
    code, out = await acli(home, "doctor")
    assert code == 1, out
    assert "restarting (Dovecot exited with status 89)" in out
    assert "dovecot.log" in out and "nothing is lost" in out
