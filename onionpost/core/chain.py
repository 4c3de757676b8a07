"""Invite chains on a shared inbox: who invited whom, who may invite, who may remove whom.

Pure policy, no storage: the inbox (``onionpost.inbox.enrolment``) loads the members, asks this
module, and applies the answer in one transaction.

Invites are a currency.  The inbox's admin (whoever runs the CLI on the inbox machine) has
an unlimited allowance; everyone else has the allowance their invite carried.  An invite that
carries the right to invite ``n`` others costs its issuer ``1 + n``: one for the person, and
the ``n`` handed on with it, so the people below someone can never outnumber what that
someone was given.  An open invite holds its cost in reserve until it is redeemed (then the
cost is spent) or expires (then it is free again).

Removal follows the chain: the admin may remove anyone, a member anyone below them, nobody
themselves or anyone beside or above them.  The people a removed member invited are either
removed too or re-parented to the remover (who then answers for them); the remover has to
say which, since neither is a safe default.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from onionpost.core.errors import InviteChainRefused, UsageError

#: The most invites one invite may carry (a bound on typing mistakes, not a policy).
MAX_CAN_INVITE = 10_000


class Invitees(Enum):
    """What happens to the people a removed member invited."""

    REMOVE = "remove"  # removed with them (--with-invitees)
    REPARENT = "reparent"  # moved under the remover (--reparent)


@dataclass(frozen=True)
class Member:
    """One mailbox in the chain.  ``invited_by`` is ``None`` for the admin's own invitees
    (and for mailboxes opened before invite chains existed, or with ``users add``)."""

    mailbox_id: bytes
    name: str
    invited_by: bytes | None
    allowance: int  # invites still theirs, counting those held by their open invites
    reserved: int = 0  # the cost of their open invites
    quota_bytes: int | None = None
    max_devices: int | None = None

    @property
    def remaining(self) -> int:
        return max(0, self.allowance - self.reserved)


@dataclass(frozen=True)
class Removal:
    """What a removal does: ``removed`` (the target first, then the people below it that go
    with it) and ``reparented`` (the target's direct invitees, moved to ``new_parent``)."""

    removed: tuple[Member, ...]
    reparented: tuple[Member, ...]
    new_parent: bytes | None


def invite_cost(can_invite: int) -> int:
    """What an invite costs its issuer: the person, plus the invites handed on with it."""
    if not 0 <= can_invite <= MAX_CAN_INVITE:
        raise UsageError(f"An invite can carry between 0 and {MAX_CAN_INVITE} invites.")
    return 1 + can_invite


def check_limits(
    own_quota: int,
    own_max_devices: int | None,
    quota_bytes: int | None,
    max_devices: int | None,
) -> int | None:
    """Refuse limits above the issuing member's own; returns the device limit of the
    invite (left out: the member's own, ``None`` when they have no limit either).  A quota
    left out is the member's own too; the inbox fills it in, since it knows whether that
    is the default or one set for them."""
    if quota_bytes is not None and quota_bytes > own_quota:
        raise InviteChainRefused(
            f"An invite from you can give at most your own quota ({_size(own_quota)})."
        )
    if max_devices is not None and own_max_devices is not None and max_devices > own_max_devices:
        raise InviteChainRefused(
            f"An invite from you can allow at most your own {own_max_devices} device(s)."
        )
    return own_max_devices if max_devices is None else max_devices


def _size(n: int) -> str:
    """Bytes for people: 2.0 GiB, 500.0 MiB."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


class Chain:
    """The members of one inbox, as a tree under the admin (``None``)."""

    def __init__(self, members: Iterable[Member]) -> None:
        self.members = {m.mailbox_id: m for m in members}
        self._children: dict[bytes | None, list[Member]] = {}
        for m in sorted(self.members.values(), key=lambda m: m.name):
            self._children.setdefault(self.parent(m.mailbox_id), []).append(m)

    def parent(self, who: bytes) -> bytes | None:
        """Who invited ``who``; an inviter no longer here counts as the admin."""
        up = self.members[who].invited_by
        return up if up in self.members and up != who else None

    def by_name(self, name: str) -> Member:
        for m in self.members.values():
            if m.name == name:
                return m
        raise UsageError(f"This inbox has no mailbox named '{name}'.")

    def invitees(self, who: bytes | None) -> list[Member]:
        """The people ``who`` invited (the admin's: everyone invited by no member)."""
        return list(self._children.get(who, []))

    def below(self, who: bytes | None) -> list[tuple[int, Member]]:
        """Everyone below ``who`` with their depth (1: invited by ``who``), depth first."""
        out: list[tuple[int, Member]] = []
        seen: set[bytes] = set()
        stack = [(1, m) for m in reversed(self.invitees(who))]
        while stack:
            depth, m = stack.pop()
            if m.mailbox_id in seen:  # a damaged chain must not loop forever
                continue
            seen.add(m.mailbox_id)
            out.append((depth, m))
            stack.extend((depth + 1, c) for c in reversed(self.invitees(m.mailbox_id)))
        return out

    def up_chain(self, who: bytes) -> list[bytes]:
        """The members above ``who``, nearest first (the admin, above them all, not listed)."""
        out: list[bytes] = []
        up = self.parent(who)
        while up is not None and up not in out and up != who:
            out.append(up)
            up = self.parent(up)
        return out

    def remaining(self, who: bytes | None) -> int | None:
        """How many invites ``who`` may still hand out (``None``: the admin, unlimited)."""
        return None if who is None else self.members[who].remaining

    def check_invite(self, inviter: bytes | None, can_invite: int) -> int:
        """The cost of an invite carrying ``can_invite`` invites, if ``inviter`` can afford it."""
        cost = invite_cost(can_invite)
        left = self.remaining(inviter)
        if left is not None and cost > left:
            if left == 0:
                raise InviteChainRefused(
                    "You have no invites left to give; ask the person who invited you for more."
                )
            raise InviteChainRefused(
                f"An invite carrying {can_invite} invite(s) costs {cost} of your allowance; "
                f"you have {left} left (so it can carry at most {left - 1})."
            )
        return cost

    def check_may_remove(self, remover: bytes | None, target: bytes) -> None:
        """The admin may remove anyone; a member only someone they are up the chain of."""
        if remover is None:
            return
        if remover == target:
            raise InviteChainRefused(
                "You cannot remove yourself through the invite chain; ask the person who "
                "invited you, or the inbox's admin."
            )
        if remover not in self.up_chain(target):
            name = self.members[target].name
            raise InviteChainRefused(
                f"You are not up the invite chain of '{name}', so you cannot remove them: "
                "only the inbox's admin and the people who invited them (directly or through "
                "others) can."
            )

    def plan_removal(
        self, remover: bytes | None, target: bytes, invitees: Invitees | None
    ) -> Removal:
        """What removing ``target`` does, or why it may not be done (yet)."""
        self.check_may_remove(remover, target)
        me = self.members[target]
        direct = self.invitees(target)
        if not direct:
            return Removal((me,), (), remover)
        if invitees is None:
            names = ", ".join(m.name for m in direct)
            raise InviteChainRefused(
                f"'{me.name}' invited {names}. Say what happens to them: --with-invitees "
                "removes them too, --reparent moves them under you."
            )
        if invitees is Invitees.REMOVE:
            return Removal((me, *(m for _, m in self.below(target))), (), remover)
        return Removal((me,), tuple(direct), remover)
