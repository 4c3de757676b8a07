"""`onionpost status` and `onionpost queue` tell the truth about mail not delivered yet.

* status counts every stage (waiting for keys, queued, deferred) and agrees with queue;
* queue says how mail left it: delivered, bounced or cancelled, not "everything was delivered";
* while this node's tor is still starting, waiting is not failing: no attempt is counted and
  no backoff grows, and the mail goes as soon as tor is up (the node wakes both queues).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from onionpost.app import admin
from onionpost.app.cli import cli
from onionpost.app.node import Node, _TorNotReady
from onionpost.app.provision import add_user, initialize
from onionpost.base.config import load
from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public
from onionpost.core.errors import TorStillConnecting
from onionpost.net.transport import DirectDialer
from onionpost.store.outbox import OutboxStore
from onionpost.store.submissions import SubmissionStore
from onionpost.testing.mailstore import filed, memory_mailbox

NOBODY = Address.for_key("bob", ed25519_public(SeededRandom(b"queue-truth")(32)))


def _home(root: Path, name: str, *users: str, toml: str = "") -> Path:
    home = root / name
    now = int(time.time())
    initialize(load(home), local=users[0], device_name="laptop", now=now)
    for user in users[1:]:
        add_user(load(home), local=user, device_name="laptop", now=now)
    (home / "onionpost.toml").write_text(
        '[inbox]\nlisten_port = 0\n[tor]\nmode = "off"\n'
        "[gateway]\nsmtp_port = 0\nimap_port = 0\nautoconfig_port = 0\n" + toml
    )
    return home


def _cli(home: Path, *args: str) -> str:
    result = CliRunner().invoke(cli, ["--data-dir", str(home), *args])
    assert result.exit_code == 0, result.output
    return result.output


def _pretend_running(home: Path, tor: dict[str, Any] | None = None) -> None:
    """A status file as a running node writes it (this process stands in for the node)."""
    info = {
        "pid": os.getpid(),
        "role": "both",
        "updated_at": int(time.time()),
        "users": [],
        "tor": tor or {"mode": "off"},
    }
    (home / "run").mkdir(exist_ok=True)
    (home / "run" / "status.json").write_text(json.dumps(info))


def _queue_rows(home: Path) -> list[str]:
    lines = _cli(home, "queue").splitlines()
    return [ln for ln in lines if ln[:1] in ("s", "o") and ln.split()[0][1:].isdigit()]


def test_status_counts_every_stage_and_agrees_with_queue(tmp_path: Path) -> None:
    home = _home(tmp_path, "node", "alice", "carol")
    now = int(time.time())
    with admin.opened(load(home)) as local:
        alice = local.account("alice")
        carol = local.account("carol").address
        raw = b"From: x\r\nSubject: s\r\n\r\nx\r\n"
        admin.submit(local, "alice", [NOBODY], raw)  # no keys anywhere: waits for them
        db = local.inbox_db()
        assert db is not None
        outbox = OutboxStore(db)

        def sealed(n: int) -> int:
            return outbox.enqueue(
                mailbox_id=alice.mailbox_id,
                device_id=alice.device.device_id,
                onion=(carol if n % 2 else NOBODY).onion,
                envelope=b"sealed",
                submission_key=f"k{n}",
                now=now,
                expires_at=now + 86_400,
            )

        sealed(1)  # queued, never tried
        deferred = sealed(2)
        outbox.mark_deferred(deferred, now=now, next_attempt_at=now + 60, error="no", code="4.4.1")
        outbox.mark_delivered(sealed(3), now=now)
        outbox.mark_bounced(sealed(4), now=now, error="no", code="5.1.1", attempted=True)
        outbox.cancel(sealed(5), now=now)
    _pretend_running(home)

    rows = _queue_rows(home)
    assert len(rows) == 3
    assert any("waiting for keys" in r for r in rows)
    assert any(r.endswith("  queued") for r in rows)
    assert any(r.endswith("  deferred") for r in rows)
    out = _cli(home, "status")
    assert "queue:      3 not delivered yet: 1 waiting for keys, 1 queued, 1 deferred" in out
    info = json.loads(_cli(home, "status", "--json"))
    assert info["queue"]["total"] == len(rows) == 3

    # once nothing waits, queue says what became of the mail instead of "all delivered"
    _cli(home, "queue", "cancel", "s1")
    _cli(home, "queue", "cancel", "o1")  # the queued one; the deferred one is delivered below
    with admin.opened(load(home)) as local:
        db = local.inbox_db()
        assert db is not None
        for row in OutboxStore(db).rows():
            OutboxStore(db).mark_delivered(row.id, now=now)
    out = _cli(home, "queue")
    assert "Nothing is waiting to be delivered." in out
    assert "In the last 30 days: 2 delivered, 1 bounced, 3 cancelled." in out
    assert "everything was delivered" not in out
    assert "queue:      nothing waiting to be delivered" in _cli(home, "status")


def test_status_says_starting_while_tor_starts(tmp_path: Path) -> None:
    home = _home(tmp_path, "node", "alice")
    with admin.opened(load(home)) as local:
        onion = local.account("alice").address.onion
    tor = {
        "mode": "launch",
        "state": "starting",
        "healthy": False,
        "bootstrap_percent": 5,
        "bootstrap_summary": "Connecting to a relay",
        "onion": onion,
        "published": False,
        "last_error": None,
        "notes": ["tor is still connecting; mail to other inboxes waits until it is"],
    }
    _pretend_running(home, tor)
    out = _cli(home, "status")
    assert "tor:        launch, starting" in out
    assert "bootstrap 5% (Connecting to a relay)" in out
    assert f"onion:      {onion}.onion, not published yet (tor is starting)" in out
    assert "?" not in out and "-.onion" not in out


async def _first_ticks_done(node: Node, *jobs: str) -> None:
    """Until the periodic jobs' first runs are over and the next is >20 s away, so only a
    wake-up can explain work done within the next 20 s."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        nxt = [node.scheduler.due_in(j) for j in jobs]
        if all(t is not None and t > 20 for t in nxt):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the scheduler's first ticks did not happen")


class _FakeTor:
    """Stands in for a connected TorRuntime (the dialer given with it does the work)."""

    async def check_health(self) -> None:
        return None

    async def rotate_log(self) -> bool:
        return False

    async def stop(self) -> None:
        return None

    def note_inbound(self) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {"mode": "launch", "healthy": True}


@pytest.mark.slow
async def test_mail_waits_uncounted_for_tor_and_goes_when_it_is_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bob_home = _home(tmp_path, "bob", "bob")
    alice_home = _home(tmp_path, "alice", "alice")
    bob = Node(load(bob_home), extensions=(memory_mailbox,))
    # alice's node runs with tor "launch", held at "still connecting" (no tor is started)
    alice = Node(load(alice_home, {"tor": {"mode": "launch"}}), extensions=(memory_mailbox,))

    async def tor_never_comes(self: Node) -> None:
        self.dialer.fallback = _TorNotReady(self)

    monkeypatch.setattr(Node, "_start_tor", tor_never_comes)
    await bob.start()
    await alice.start()
    try:
        assert alice.submissions is not None and alice.inbox is not None
        assert alice.worker is not None and bob.filer is not None
        bob_address = bob.devices["bob"].address
        me = alice.devices["alice"]
        raw = f"From: {me.address}\r\nTo: {bob_address}\r\nSubject: waited\r\n\r\nhi\r\n"
        sid = alice.submissions.submit("alice", [bob_address], raw.encode())
        now = alice.clock.now()
        row = alice.inbox.outbox.enqueue(
            mailbox_id=me.account.mailbox_id,
            device_id=me.account.device.device_id,
            onion=bob_address.onion,
            envelope=b"not really sealed",
            submission_key="sealed-before",
            now=now,
            expires_at=now + 86_400,
        )
        for _ in range(3):  # passes while tor is not up: nothing is counted, nothing backs off
            await alice.submissions.process_due()
            await alice.worker.run_due()
        subs = SubmissionStore(alice.submissions.db).listing()
        assert [(r.submission_id, r.attempts) for r in subs] == [(sid, 0)]
        assert subs[0].next_attempt_at <= alice.clock.now()
        assert "still connecting" in (subs[0].last_error or "")
        waiting = alice.inbox.outbox.get(row)
        assert waiting is not None and waiting.attempts == 0 and waiting.next_attempt_at == now
        # a row claimed in the moment tor went away is not an attempt either
        alice.worker._failed(waiting, TorStillConnecting())
        after = alice.inbox.outbox.get(row)
        assert after is not None and after.attempts == 0 and after.next_attempt_at == now
        alice.inbox.outbox.release_leases()
        assert alice.status()["queue"] == {
            "waiting for keys": 1,
            "queued": 1,
            "deferred": 0,
            "at the inbox": 0,
            "total": 2,
        }

        # tor comes up: both queues are woken, so the mail goes at once, not at the next tick
        await _first_ticks_done(alice, "seal", "deliver")
        routes = DirectDialer({bob_address.onion: f"127.0.0.1:{bob.api_port}"})
        alice._tor_connected(_FakeTor(), routes)  # type: ignore[arg-type]
        # far longer than it takes (well under a second), shorter than the 30 s tick that
        # would send it without the wake-up
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            tried = alice.inbox.outbox.get(row)
            if filed(bob, "bob") and tried is not None and tried.attempts:
                break
            await asyncio.sleep(0.05)
        assert len(filed(bob, "bob")) == 1
        tried = alice.inbox.outbox.get(row)
        assert tried is not None and tried.attempts == 1  # the outbox was woken too
    finally:
        await alice.stop()
        await bob.stop()
