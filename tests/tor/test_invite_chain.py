"""An invite chain on a shared inbox over the private Tor network: real processes, real CLI.

The Pi P runs the inbox; alice, carol, dave and bob each have a machine of their own whose
CLI reaches P only through its onion service (each command starts a tor of its own, as on a
laptop whose node is not running).  Alice invites carol, carol invites dave, from their own
machines; bob, not up the chain, cannot remove dave; alice removes carol and dave moves under
her.  The same flow on loopback, with more refusals, is tests/integration/test_invite_chain.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.tor.test_two_machines import Machine, machines

__all__ = ["machines"]

pytestmark = [pytest.mark.slow]


def tree(out: str) -> dict[str, list[str]]:
    _, *rows = out.splitlines()
    return {r.split()[0]: r.split()[1:] for r in rows if r.strip()}


def test_invite_chain_with_removal_over_tor(machines: Callable[..., Machine]) -> None:
    pi = machines("pi")
    pi.cli("init", "--role", "inbox")
    pi.start()

    def join(name: str, code: str) -> Machine:
        m = machines(name)
        assert f"{name}@" in m.cli("init", "--invite", code, "--device-name", name)
        return m

    def invite(by: Machine, name: str, *options: str) -> str:
        return str(json.loads(by.cli("users", "invite", name, "--json", *options))["code"])

    alice = join("alice", invite(pi, "alice", "--can-invite", "2"))
    bob = join("bob", invite(pi, "bob"))
    carol = join("carol", invite(alice, "carol", "--can-invite", "1"))
    dave = join("dave", invite(carol, "dave"))
    assert "no invites left" in carol.cli("users", "invite", "erin", ok=False)

    rows = tree(pi.cli("users", "tree"))
    assert rows["carol"][:2] == ["alice", "0"] and rows["dave"][:2] == ["carol", "0"]
    assert rows["alice"][:2] == ["(admin)", "0"]

    out = bob.cli("users", "remove", "dave", "--yes", ok=False)
    assert "not up the invite chain of 'dave'" in out
    out = alice.cli("users", "remove", "carol", "--yes", ok=False)
    assert "--with-invitees" in out and "--reparent" in out
    out = alice.cli("users", "remove", "carol", "--reparent", "--yes")
    assert "Removed carol" in out and "Now invited by you: dave" in out

    rows = tree(pi.cli("users", "tree"))
    assert "carol" not in rows and rows["dave"][0] == "alice"
    assert list(tree(dave.cli("users", "tree"))) == ["dave"]
    assert "may not use the mailbox" in carol.cli("users", "tree", ok=False)
