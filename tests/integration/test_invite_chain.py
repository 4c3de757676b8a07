"""Invite chains on a shared inbox, on loopback (tor off, a real inbox node, the real CLI).

The admin on the inbox machine (the Pi) invites alice with invites of her own; alice, on her
own machine, invites carol with one to hand on; carol invites dave from hers.  Each of those
invites is minted by the Pi over the person's device session and paid from their allowance.
Someone not up the chain cannot remove anyone; alice removes carol and re-parents dave to
herself; the admin removes alice with everyone below her.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from onionpost.app.node import Node
from onionpost.base.config import load
from onionpost.testing.mailstore import memory_mailbox
from tests.integration.test_enrolment import acli, free_port, tor_off, write_config

pytestmark = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture
async def pi(tmp_path: Path) -> AsyncIterator[tuple[Node, str]]:
    home = tmp_path / "pi"
    code, out = await acli(home, "init", "--role", "inbox")
    assert code == 0, out
    onion = out.split("Inbox address:")[1].split()[0].removesuffix(".onion")
    write_config(home, 'role = "inbox"\n' + tor_off({}, f"listen_port = {free_port()}\n"))
    node = Node(load(home), extensions=(memory_mailbox,))
    await node.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, lambda: None)
    try:
        yield node, onion
    finally:
        await node.stop()
        asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)


async def invite(home: Path, name: str, *options: str) -> str:
    code, out = await acli(home, "users", "invite", name, "--json", *options)
    assert code == 0, out
    data = json.loads(out)
    assert data["user"] == name
    return str(data["code"])


async def join(pi: tuple[Node, str], tmp_path: Path, name: str, code: str) -> Path:
    """``init --invite`` on the person's own machine; returns its data directory."""
    p, onion = pi
    home = tmp_path / name
    write_config(home, tor_off({onion: p.api_port}))
    status, out = await acli(home, "init", "--invite", code, "--device-name", name)
    assert status == 0, out
    return home


def tree(out: str) -> dict[str, list[str]]:
    """`users tree` as {user: [invited by, invites left, quota..., devices]}."""
    header, *rows = out.splitlines()
    assert header.split()[:2] == ["USER", "INVITED"]
    return {r.split()[0]: r.split()[1:] for r in rows}


async def test_invite_along_the_chain_then_remove_with_reparenting(
    pi: tuple[Node, str], tmp_path: Path
) -> None:
    p, _ = pi
    admin = p.config.data_dir
    assert p.inbox is not None
    alice = await join(pi, tmp_path, "alice", await invite(admin, "alice", "--can-invite", "3"))
    bob = await join(pi, tmp_path, "bob", await invite(admin, "bob"))

    # alice invites carol from her own machine: 1 + 1 of her 3
    carol_code = await invite(alice, "carol", "--can-invite", "1", "--max-devices", "2")
    carol = await join(pi, tmp_path, "carol", carol_code)
    # no more than her allowance, nor more than her own limits
    code, out = await acli(carol, "users", "invite", "dave", "--max-devices", "3")
    assert code == 1 and "at most your own 2 device(s)" in out, out
    code, out = await acli(alice, "users", "invite", "zed", "--quota", "100G")
    assert code == 1 and "at most your own quota (2.0 GiB)" in out, out
    code, out = await acli(alice, "users", "invite", "zed", "--can-invite", "5")
    assert code == 1 and "you have 1 left" in out and "Traceback" not in out, out
    dave = await join(pi, tmp_path, "dave", await invite(carol, "dave"))
    code, out = await acli(carol, "users", "invite", "erin")
    assert code == 1 and "no invites left" in out, out
    code, out = await acli(bob, "users", "invite", "erin")
    assert code == 1 and "no invites left" in out, out

    # the admin sees the whole chain; alice sees herself and those below her
    code, out = await acli(admin, "users", "tree")
    assert code == 0, out
    rows = tree(out)
    assert rows["(admin)"][:2] == ["-", "unlimited"]
    assert rows["alice"][:2] == ["(admin)", "1"]
    assert rows["carol"][:2] == ["alice", "0"] and rows["carol"][-1] == "2"
    assert rows["dave"][:2] == ["carol", "0"] and rows["dave"][-1] == "2"  # carol's own limit
    assert rows["bob"][:2] == ["(admin)", "0"]
    assert out.index("  carol") < out.index("    dave")  # indented under their inviter
    code, out = await acli(alice, "users", "tree")
    assert code == 0, out
    assert list(tree(out)) == ["alice", "carol", "dave"]

    # nobody removes anyone they are not up the chain of
    code, out = await acli(bob, "users", "remove", "dave", "--yes")
    assert code == 1 and "not up the invite chain of 'dave'" in out, out
    code, out = await acli(dave, "users", "remove", "carol", "--yes")
    assert code == 1 and "not up the invite chain of 'carol'" in out, out
    # removing someone who invited people needs a choice (no terminal here to ask)
    code, out = await acli(alice, "users", "remove", "carol", "--yes")
    assert code == 1 and "--with-invitees" in out and "--reparent" in out, out
    assert p.inbox.store.mailbox_by_local("carol") is not None

    code, out = await acli(alice, "users", "remove", "carol", "--reparent", "--yes")
    assert code == 0, out
    assert "Removed carol" in out and "Now invited by you: dave" in out, out
    assert p.inbox.store.mailbox_by_local("carol") is None
    assert p.inbox.store.mailbox_by_local("dave") is not None
    code, out = await acli(admin, "users", "tree")
    rows = tree(out)
    assert "carol" not in rows and rows["dave"][0] == "alice"
    # dave's device still works at the inbox; carol's is refused
    code, out = await acli(dave, "users", "tree")
    assert code == 0 and list(tree(out)) == ["dave"], out
    code, out = await acli(carol, "users", "tree")
    assert code == 1 and "Traceback" not in out, out

    # the admin removes alice with everyone below her
    code, out = await acli(admin, "users", "remove", "alice", "--yes")
    assert code == 1 and "'alice' invited dave" in out, out
    code, out = await acli(admin, "users", "remove", "alice", "--with-invitees", "--yes")
    assert code == 0 and "Also removed, invited by them: dave" in out, out
    assert [m.local for m in p.inbox.store.mailboxes()] == ["bob"]


async def test_open_invites_hold_allowance_and_the_admin_reparents_to_itself(
    pi: tuple[Node, str], tmp_path: Path
) -> None:
    p, _ = pi
    admin = p.config.data_dir
    assert p.inbox is not None and p.enrolment is not None
    alice = await join(pi, tmp_path, "alice", await invite(admin, "alice", "--can-invite", "3"))
    bob = await join(pi, tmp_path, "bob", await invite(alice, "bob"))
    await invite(alice, "cy", "--can-invite", "1")  # open: holds 2 of alice's 2 left
    code, out = await acli(alice, "users", "invite", "dee")
    assert code == 1 and "no invites left" in out, out
    # an invite that expires frees what it held
    p.enrolment.store.db.execute("UPDATE invites SET expires_at = 1 WHERE local = 'cy'")
    rows = tree((await acli(alice, "users", "tree"))[1])
    assert rows["alice"][:2] == ["(admin)", "2"] and rows["bob"][:2] == ["alice", "0"]
    await invite(alice, "dee")  # open when alice is removed: it lapses with her

    code, out = await acli(admin, "users", "remove", "alice", "--reparent", "--yes")
    assert code == 0 and "Now invited by the admin: bob" in out, out
    rows = tree((await acli(admin, "users", "tree"))[1])
    assert set(rows) == {"(admin)", "bob"} and rows["bob"][0] == "(admin)"
    assert p.enrolment.store.open_invites(p.clock.now()) == []
    # bob's devices still work; alice's are refused
    code, out = await acli(bob, "users", "tree")
    assert code == 0 and list(tree(out)) == ["bob"], out
    code, out = await acli(alice, "users", "invite", "eve")
    assert code == 1 and "may not use the mailbox" in out, out
