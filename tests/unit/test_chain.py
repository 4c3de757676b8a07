"""The invite chain's policy (onionpost.core.chain): allowances, who may remove whom,
re-parenting."""

from __future__ import annotations

import pytest

from onionpost.core.chain import MAX_CAN_INVITE, Chain, Invitees, Member, check_limits, invite_cost
from onionpost.core.errors import InviteChainRefused, UsageError

MIB = 1 << 20


def mid(name: str) -> bytes:
    return name.encode().ljust(16, b"\0")


def member(name: str, up: str | None, allowance: int = 0, reserved: int = 0) -> Member:
    return Member(mid(name), name, mid(up) if up else None, allowance, reserved)


def household() -> Chain:
    """admin -> alice (5 left) -> carol (2) -> dave (0), erin (0); admin -> bob (0);
    alice -> frank (0)."""
    return Chain(
        [
            member("alice", None, 5),
            member("bob", None),
            member("carol", "alice", 2),
            member("dave", "carol"),
            member("erin", "carol"),
            member("frank", "alice"),
        ]
    )


def test_an_invite_costs_the_person_plus_what_it_hands_on() -> None:
    assert invite_cost(0) == 1
    assert invite_cost(3) == 4
    with pytest.raises(UsageError):
        invite_cost(-1)
    with pytest.raises(UsageError):
        invite_cost(MAX_CAN_INVITE + 1)


def test_allowance_arithmetic() -> None:
    chain = Chain([member("alice", None, 5, reserved=2), member("bob", None)])
    a = mid("alice")
    assert chain.remaining(None) is None  # the admin: unlimited
    assert chain.check_invite(None, 1000) == 1001
    assert chain.remaining(a) == 3  # 5, of which an open invite holds 2
    assert chain.check_invite(a, 2) == 3  # exactly what is left
    with pytest.raises(InviteChainRefused, match=r"you have 3 left .*at most 2"):
        chain.check_invite(a, 3)
    with pytest.raises(InviteChainRefused, match="no invites left"):
        chain.check_invite(mid("bob"), 0)
    # more held than given (an allowance lowered by hand) is nothing left, never negative
    assert Member(a, "alice", None, 1, 4).remaining == 0


def test_an_invite_gives_no_more_than_the_inviters_own_limits() -> None:
    assert check_limits(100 * MIB, 3, None, None) == 3  # devices: the inviter's own
    assert check_limits(100 * MIB, 3, 50 * MIB, 2) == 2
    assert check_limits(100 * MIB, None, None, 64) == 64  # no limit of their own
    with pytest.raises(InviteChainRefused, match=r"your own quota \(100.0 MiB\)"):
        check_limits(100 * MIB, None, 200 * MIB, None)
    with pytest.raises(InviteChainRefused, match="your own 3 device"):
        check_limits(100 * MIB, 3, None, 4)


def test_the_tree() -> None:
    chain = household()
    assert [(d, m.name) for d, m in chain.below(None)] == [
        (1, "alice"),
        (2, "carol"),
        (3, "dave"),
        (3, "erin"),
        (2, "frank"),
        (1, "bob"),
    ]
    assert [m.name for _, m in chain.below(mid("carol"))] == ["dave", "erin"]
    assert chain.up_chain(mid("dave")) == [mid("carol"), mid("alice")]
    assert chain.up_chain(mid("bob")) == []
    assert chain.by_name("erin").mailbox_id == mid("erin")
    with pytest.raises(UsageError, match="no mailbox named 'zed'"):
        chain.by_name("zed")


def test_an_inviter_no_longer_there_counts_as_the_admin_and_a_loop_ends() -> None:
    chain = Chain([member("orphan", "gone"), member("x", "y"), member("y", "x")])
    assert chain.parent(mid("orphan")) is None
    assert [m.name for _, m in chain.below(None)] == ["orphan"]
    assert chain.up_chain(mid("x")) == [mid("y")]  # a damaged chain does not loop


def test_who_may_remove_whom() -> None:
    chain = household()
    a, c, d, b, f = (mid(n) for n in ("alice", "carol", "dave", "bob", "frank"))
    chain.check_may_remove(None, d)  # the admin: anyone
    chain.check_may_remove(a, d)  # up the chain, two steps
    chain.check_may_remove(c, d)
    for remover, target in ((d, c), (b, d), (f, d), (c, f), (b, a)):
        with pytest.raises(InviteChainRefused, match="not up the invite chain"):
            chain.check_may_remove(remover, target)
    with pytest.raises(InviteChainRefused, match="cannot remove yourself"):
        chain.check_may_remove(c, c)


def test_removing_someone_who_invited_people_needs_a_choice() -> None:
    chain = household()
    a, c, d = mid("alice"), mid("carol"), mid("dave")
    with pytest.raises(InviteChainRefused, match=r"'carol' invited dave, erin.*--with-invitees"):
        chain.plan_removal(a, c, None)
    plan = chain.plan_removal(a, d, None)  # nobody below: no choice needed
    assert [m.name for m in plan.removed] == ["dave"] and plan.reparented == ()


def test_removal_with_invitees_takes_the_whole_branch() -> None:
    plan = household().plan_removal(None, mid("alice"), Invitees.REMOVE)
    assert [m.name for m in plan.removed] == ["alice", "carol", "dave", "erin", "frank"]
    assert plan.reparented == ()


def test_reparenting_moves_the_direct_invitees_to_the_remover() -> None:
    chain = household()
    plan = chain.plan_removal(mid("alice"), mid("carol"), Invitees.REPARENT)
    assert [m.name for m in plan.removed] == ["carol"]
    assert [m.name for m in plan.reparented] == ["dave", "erin"]
    assert plan.new_parent == mid("alice")
    plan = chain.plan_removal(None, mid("alice"), Invitees.REPARENT)
    assert [m.name for m in plan.reparented] == ["carol", "frank"]  # not dave and erin
    assert plan.new_parent is None  # the admin
