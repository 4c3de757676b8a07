"""`onionpost doctor` names each problem and what to do about it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from onionpost.app.doctor import Finding, MiB, _disk
from onionpost.app.provision import initialize
from onionpost.base.clock import SystemClock
from onionpost.base.config import load
from tests.doctor_report import flagged, flagged_beyond_host

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
    assert flagged_beyond_host(out) == [], out
    assert (code == 0) == (flagged(out) == []), out
    assert "Everything checked is fine" in out or flagged(out) == ["disk"]
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


def test_doctor_warns_before_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below a GiB free is flagged early; below min_free_mib it says new mail is refused."""

    def free(mib: int) -> Finding:
        usage = SimpleNamespace(total=1 << 40, used=(1 << 40) - mib * MiB, free=mib * MiB)
        monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage)
        return _disk(tmp_path, 64)

    assert free(4096) == Finding("disk", True, "4 GiB free")
    soon = free(511)
    assert not soon.ok and soon.detail == "511 MiB free" and "soon" in soon.fix
    now = free(50)
    assert not now.ok and "only 50 MiB free: new mail is refused" in now.detail
    assert "free disk space now" in now.fix
