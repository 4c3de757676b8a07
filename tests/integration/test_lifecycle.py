"""`onionpost run` as a process: one node per data directory, and stopping when told.

Real `onionpost run` processes.  "Stops within 10 s" is checked through the exit status: the
node measures its own orderly stop and exits with status 1 (not 0) when it overruns its 8 s
grace, so the test needs no timing bound of its own that a loaded machine could miss.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from onionpost.app import admin
from onionpost.app.provision import add_user, initialize
from onionpost.base.config import load
from onionpost.core.address import Address
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.db import Database
from onionpost.testing.mailstore import maildir_messages

pytestmark = pytest.mark.slow

#: A directory authority where nothing listens: a launched tor stays in its bootstrap.
NOWHERE = [
    "TestingTorNetwork 1",
    "DirAuthority nowhere orport=9 no-v2 v3ident=" + "A" * 40 + " 127.0.0.1:9 " + "B" * 40,
]


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port that takes connections and never answers: an inbox that hangs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(512)
        yield int(s.getsockname()[1])


def _home(root: Path, name: str, toml: str) -> Path:
    home = root / name
    now = int(time.time())
    initialize(load(home), local="alice", device_name="laptop", now=now)
    add_user(load(home), local="carol", device_name="laptop", now=now)
    (home / "onionpost.toml").write_text(
        toml + "\n[gateway]\nsmtp_port = 0\nimap_port = 0\nautoconfig_port = 0\n"
    )
    return home


def _tor_off(extra: str = "") -> str:
    return f'[inbox]\nlisten_port = 0\n[tor]\nmode = "off"\n{extra}'


def _address(home: Path, user: str) -> Address:
    with admin.opened(load(home)) as local:
        return local.account(user).address


def _start(home: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ONIONPOST_HOME": str(home)}
    with log.open("ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "onionpost", "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def _wait(proc: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 120  # only against a hang; start-up takes a second or two
    while not ready():
        assert proc.poll() is None, f"the node exited with {proc.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"the node did not come up:\n{log.read_text()}"
        time.sleep(0.02)


def _holds_lock(home: Path, proc: subprocess.Popen[bytes]) -> bool:
    """Signal handlers are installed before the lock is taken, so from here on a signal
    reaches onionpost's own handling (before it, the interpreter is still importing)."""
    try:
        return (home / "run" / "node.lock").read_text().strip() == str(proc.pid)
    except OSError:
        return False


def _running(home: Path, proc: subprocess.Popen[bytes]) -> bool:
    try:
        return json.loads((home / "run" / "status.json").read_text())["pid"] == proc.pid
    except (OSError, ValueError, KeyError):
        return False


def _stop(proc: subprocess.Popen[bytes], log: Path) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the node ignored SIGTERM:\n{log.read_text()[-4000:]}")
    return code, time.monotonic() - started


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "onionpost", "--data-dir", str(home), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_one_node_per_data_directory(mail_tmp: Path) -> None:
    tmp_path = mail_tmp
    home = _home(tmp_path, "node", _tor_off())
    log = tmp_path / "first.log"
    first = _start(home, log)
    try:
        _wait(first, log, lambda: _running(home, first))
        second = _cli(home, "run")
        assert second.returncode == 1, second.stderr
        assert second.stderr.strip() == (
            f"onionpost: Another onionpost node (pid {first.pid}) already runs on {home}; "
            "stop it first or use --data-dir."
        )
        assert first.poll() is None
        # every other command works beside the running node
        others = (
            ("status",),
            ("queue",),
            ("users", "list"),
            ("address",),
            ("devices", "--user", "alice"),
        )
        for args in others:
            done = _cli(home, *args)
            assert done.returncode == 0, (args, done.stderr)
        assert "node:       running" in _cli(home, "status").stdout
    finally:
        code, _ = _stop(first, log)
    assert code == 0, log.read_text()
    # The kernel drops the lock with the process, however it ends: no stale lock after -9.
    third = _start(home, log)
    _wait(third, log, lambda: _running(home, third))
    third.kill()
    third.wait()
    fourth = _start(home, log)
    _wait(fourth, log, lambda: _running(home, fourth))
    assert _stop(fourth, log)[0] == 0, log.read_text()


@dataclass
class _Setup:
    """One data directory and what was submitted on it before each stop."""

    name: str
    home: Path
    runs: int
    sent: list[str] = field(default_factory=list)
    codes: list[tuple[int, float, str]] = field(default_factory=list)


def _submit(setup: _Setup, to: list[Address], subject: str) -> None:
    with admin.opened(load(setup.home)) as local:
        alice = local.account("alice").address
        raw = f"From: {alice}\r\nTo: {', '.join(map(str, to))}\r\nSubject: {subject}\r\n\r\nx\r\n"
        admin.submit(local, "alice", to, raw.encode())
    setup.sent.append(subject)


def _stop_at_random_moments(setup: _Setup, to: list[Address], rng: random.Random) -> None:
    log = setup.home / "node.log"
    for n in range(setup.runs):
        _submit(setup, to, f"{setup.name} {n}")  # acknowledged before the node starts
        size = log.stat().st_size if log.exists() else 0
        proc = _start(setup.home, log)
        _wait(proc, log, lambda p=proc: _holds_lock(setup.home, p))  # type: ignore[misc]
        time.sleep(rng.uniform(0.0, 2.5))
        code, seconds = _stop(proc, log)
        with log.open("rb") as f:
            f.seek(size)
            setup.codes.append((code, seconds, f.read().decode(errors="replace")))


def _subjects(home: Path, user: str) -> list[str]:
    out = []
    for m in maildir_messages(home, user, "INBOX"):
        for line in m.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
            if line.lower().startswith(b"subject:"):
                out.append(line.split(b":", 1)[1].strip().decode())
    return out


def test_sigterm_at_random_moments_stops_cleanly_and_keeps_the_mail(
    mail_tmp: Path, black_hole: int
) -> None:
    """50 stops at random moments: starting, tor bootstrapping, sealing for an inbox that
    hangs, delivering, syncing with an own inbox that hangs; each exits 0 with nothing lost."""
    tmp_path = mail_tmp
    bob = Address.parse("bob@" + _address_of_nobody() + ".onion")
    hole = f'"127.0.0.1:{black_hole}"'
    both = _Setup(
        "both",
        _home(tmp_path, "both", _tor_off(f'static_routes = {{ "{bob.onion}" = {hole} }}')),
        runs=20,
    )
    gateway_home = tmp_path / "gateway"
    gateway = _Setup("gateway", gateway_home, runs=18)
    _home(tmp_path, "gateway", "")
    own = _address(gateway_home, "alice").onion
    # the same keys, run as a gateway whose inbox (elsewhere) takes connections and hangs
    (gateway_home / "onionpost.toml").write_text(
        'role = "gateway"\n'
        + _tor_off(f'static_routes = {{ "{own}" = {hole} }}')
        + "\n[gateway]\nsmtp_port = 0\nimap_port = 0\nautoconfig_port = 0\n"
    )
    setups = [both, gateway]
    if shutil.which("tor"):
        torrc = json.dumps(NOWHERE)
        tor = _Setup(
            "tor",
            _home(
                tmp_path,
                "tor",
                f"[inbox]\nlisten_port = 0\n[tor]\nextra_torrc = {torrc}\nbootstrap_timeout = 600",
            ),
            runs=12,
        )
        setups.append(tor)
    else:
        both.runs += 12
    carol = {s.name: _address(s.home, "carol") for s in setups}
    rng = random.Random(os.environ.get("LIFECYCLE_SEED", "onionpost"))
    errors: list[BaseException] = []

    def work(setup: _Setup, seed: int) -> None:
        to = [carol[setup.name]] + ([bob] if setup.name == "both" else [])
        try:
            _stop_at_random_moments(setup, to, random.Random(seed))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s, rng.random())) for s in setups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert sum(s.runs for s in setups) == 50
    for setup in setups:
        for code, seconds, err in setup.codes:
            assert code == 0, f"{setup.name}: exit {code} after {seconds:.1f} s:\n{err[-4000:]}"
            assert "Traceback" not in err, f"{setup.name}:\n{err[-4000:]}"
    # Nothing acknowledged was lost: each message is filed for carol exactly once, or waits.
    for setup in setups:
        filed = _subjects(setup.home, "carol")
        with admin.opened(load(setup.home)) as local:
            waiting = admin.queue(local)
        subject_of = _subject_of(setup.home)
        for subject in setup.sent:
            for_carol = [
                i
                for i in waiting
                if i.recipient == str(carol[setup.name]) and subject_of(i.id) == subject
            ]
            assert filed.count(subject) + len(for_carol) >= 1, (setup.name, subject)
            assert filed.count(subject) <= 1, (setup.name, subject)
        if setup.name == "both":  # bob's copies wait for keys nobody can fetch
            assert len([i for i in waiting if i.recipient == str(bob)]) == len(setup.sent)


def _address_of_nobody() -> str:
    from onionpost.core.crypto.primitives import SeededRandom, ed25519_public

    return Address.for_key("x", ed25519_public(SeededRandom(b"nobody")(32))).onion


def _subject_of(home: Path) -> Callable[[str], str | None]:
    """Queue id -> the subject of the submission it stands for."""
    db = Database(home / "device.db", DEVICE_COMPONENTS)
    try:
        rows = db.all(
            "SELECT s.id, r.outbox_id, s.headers FROM submission_recipients r"
            " JOIN submissions s ON s.id = r.submission_id"
        )
    finally:
        db.close()
    subjects: dict[str, str] = {}
    for sid, oid, headers in rows:
        for line in bytes(headers).decode().split("\r\n"):
            if line.lower().startswith("subject:"):
                subjects[f"s{sid}"] = line.split(":", 1)[1].strip()
                if oid is not None:
                    subjects[f"o{oid}"] = subjects[f"s{sid}"]
    return subjects.get


_STUCK = """
import sys, time
from onionpost.app import lifecycle
stopper = lifecycle._Stopper(grace=float(sys.argv[1]), exit_before_attach=sys.argv[2] == "early")
stopper.install()
print("ready", flush=True)
while not stopper.requested:
    time.sleep(0.01)
print("stopping", flush=True)
time.sleep(600)  # a stop that never finishes
"""


def _stuck(grace: float, *, early: bool = False) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _STUCK, str(grace), "early" if early else "attached"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


def test_a_second_signal_exits_at_once() -> None:
    proc = _stuck(grace=600)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None and proc.stdout.readline() == "stopping\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "second SIGTERM: stopping at once" in proc.communicate()[1]


def test_a_stop_before_the_node_is_imported_exits_at_once_and_cleanly() -> None:
    """serve()'s stopper, before the node's modules are imported (nothing has started)."""
    proc = _stuck(grace=600, early=True)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert "SIGTERM before the node started: stopped" in proc.communicate()[1]


def test_a_stop_that_overruns_its_grace_ends_the_process() -> None:
    proc = _stuck(grace=1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 1
    err = proc.communicate()[1]
    assert "did not stop within 1 s; exiting now" in err
    assert "most recent call first" in err  # the stacks, for the bug report
