"""The two mail queues as state machines: which state may follow which, in one table each.

Mail waits in two queues (docs/queues.md draws both).  The device's *submission* queue
holds one row per (submission, recipient) until the message is sealed and handed to the
inbox's outbox, and then until the outbox reports its fate.  The inbox's *outbox* holds one
row per (sealed copy, destination inbox) until it is delivered, bounced, cancelled, or
handed back to be sealed again because the recipient's keys changed (``reseal``).

The stores write these states in SQL; every method that changes (or keeps) a row's state
first asks :func:`check` whether the step is in the table, and uses the table's source
state in its ``WHERE`` clause.  So no store can move a row along an edge that is not
drawn, and the diagram, the table and the SQL cannot drift apart: ``tests/unit/
test_queuestate.py`` fails when docs/queues.md and :data:`OUTBOX` / :data:`SUBMISSION`
differ.  An illegal step raises :class:`~onionpost.core.errors.IllegalTransition` (a bug, or an
inbox reporting a state this version does not know), never a silent wrong update.

A step whose row is no longer in the source state (cancelled while it was being
delivered, say) is not illegal: the guarded ``UPDATE`` simply changes nothing, as it
always did.

The node API speaks an older vocabulary: an outbox row handed back for re-sealing is
reported as ``bounced`` with the code :data:`RESEAL_CODE` (devices of every version
understand that).  :func:`outbox_to_wire` and :func:`outbox_from_wire` translate, here
and nowhere else.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from onionpost.core.errors import IllegalTransition

#: The code an outbox row handed back for re-sealing carries, and how the node API marks it
#: (``bounced`` with this code): the recipient's inbox refused the keys it was sealed with.
RESEAL_CODE = "5.7.5"


class OutboxState(StrEnum):
    """An outbox row's ``state`` column."""

    QUEUED = "queued"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    CANCELLED = "cancelled"
    #: Handed back: the recipient's keys changed, the submitting device must seal it again.
    RESEAL = "reseal"


class RecipientState(StrEnum):
    """A submission recipient's ``state`` column (device side)."""

    #: Waiting to be sealed (keys not had yet, or this node's tor is not up).
    PENDING = "pending"
    #: Sealed and handed to the inbox's outbox; waiting to hear its fate.
    QUEUED = "queued"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Transition:
    """One edge: ``source`` (None: the row is created) to ``target``, and what causes it."""

    source: str | None
    target: str
    event: str


@dataclass(frozen=True)
class Machine:
    """A queue's states and its legal steps (a step that keeps the state is a self-loop)."""

    name: str
    states: tuple[str, ...]
    transitions: tuple[Transition, ...]
    #: States a row never leaves by a step of its own.
    final: frozenset[str]
    #: States whose rows are deleted once they are old enough (``[*]`` in the diagram).
    purged: frozenset[str]

    def __post_init__(self) -> None:
        pairs = [(t.source, t.target) for t in self.transitions]
        if len(pairs) != len(set(pairs)):
            raise ValueError(f"{self.name}: an edge is listed twice")
        known = set(self.states)
        for t in self.transitions:
            if t.target not in known or (t.source is not None and t.source not in known):
                raise ValueError(f"{self.name}: {t} names an unknown state")
            if t.source in self.final:
                raise ValueError(f"{self.name}: {t} leaves a final state")
        if not self.final <= self.purged <= known:
            raise ValueError(f"{self.name}: every final state must be purged, eventually")

    def check(self, source: str | None, target: str) -> Transition:
        """The edge from ``source`` to ``target``; :class:`IllegalTransition` if none."""
        for t in self.transitions:
            if t.source == source and t.target == target:
                return t
        raise IllegalTransition(
            f"A {self.name} entry cannot go from '{source or 'new'}' to '{target}'."
        )

    def active(self) -> tuple[str, ...]:
        """States a row can still leave (not final), in declaration order."""
        return tuple(s for s in self.states if s not in self.final)


def _edges(rows: Iterable[tuple[str | None, str, str]]) -> tuple[Transition, ...]:
    return tuple(Transition(s, t, e) for s, t, e in rows)


_O = OutboxState
OUTBOX = Machine(
    "outbox",
    tuple(_O),
    _edges(
        [
            (None, _O.QUEUED, "enqueue"),
            (_O.QUEUED, _O.QUEUED, "claim / defer / wait / retry now"),
            (_O.QUEUED, _O.DELIVERED, "deliver"),
            (_O.QUEUED, _O.BOUNCED, "bounce"),
            (_O.QUEUED, _O.CANCELLED, "cancel"),
            (_O.QUEUED, _O.RESEAL, "stale keys"),
            (_O.RESEAL, _O.QUEUED, "enqueue again"),
        ]
    ),
    frozenset({_O.DELIVERED, _O.BOUNCED, _O.CANCELLED}),
    # a re-seal row whose device never came back for it goes with the finished ones
    frozenset({_O.DELIVERED, _O.BOUNCED, _O.CANCELLED, _O.RESEAL}),
)

_R = RecipientState
SUBMISSION = Machine(
    "submission",
    tuple(_R),
    _edges(
        [
            (None, _R.PENDING, "submit"),
            (_R.PENDING, _R.PENDING, "defer / wait / retry now"),
            (_R.PENDING, _R.QUEUED, "hand to outbox"),
            (_R.PENDING, _R.DELIVERED, "own copy filed"),
            (_R.PENDING, _R.BOUNCED, "bounce"),
            (_R.PENDING, _R.CANCELLED, "cancel"),
            (_R.QUEUED, _R.QUEUED, "progress"),
            (_R.QUEUED, _R.PENDING, "reseal"),
            (_R.QUEUED, _R.DELIVERED, "outbox delivered"),
            (_R.QUEUED, _R.BOUNCED, "outbox bounced"),
            (_R.QUEUED, _R.CANCELLED, "outbox cancelled"),
        ]
    ),
    frozenset({_R.DELIVERED, _R.BOUNCED, _R.CANCELLED}),
    frozenset({_R.DELIVERED, _R.BOUNCED, _R.CANCELLED}),
)

MACHINES = (OUTBOX, SUBMISSION)


# --- the node API's vocabulary ------------------------------------------------------------

#: The outbox states the node API names (``GET /v1/device/outbox?states=``).
WIRE_OUTBOX_STATES = ("queued", "delivered", "bounced", "cancelled")


def outbox_to_wire(state: str) -> str:
    """How the node API reports a stored outbox state (a re-seal row is ``bounced``)."""
    return OutboxState.BOUNCED.value if state == OutboxState.RESEAL else state


def outbox_from_wire(state: object, code: object) -> OutboxState | None:
    """The outbox state an inbox reported, or None for one this version does not know."""
    if state == OutboxState.BOUNCED and code == RESEAL_CODE:
        return OutboxState.RESEAL
    try:
        return OutboxState(state) if isinstance(state, str) else None
    except ValueError:
        return None


def outbox_states_from_wire(states: Iterable[str]) -> tuple[str, ...]:
    """The stored states that the node API's ``states`` stand for (``bounced`` includes the
    re-seal rows, as it always did); ValueError for a name the API does not know."""
    out: list[str] = []
    for s in states:
        if s not in WIRE_OUTBOX_STATES:
            raise ValueError(s)
        out.append(s)
        if s == OutboxState.BOUNCED:
            out.append(OutboxState.RESEAL.value)
    return tuple(dict.fromkeys(out))


def recipient_outcome(outbox_state: OutboxState) -> RecipientState | None:
    """The final state a recipient handed to the outbox takes when its row reached
    ``outbox_state``; None while the row is on its way, and for a re-seal row, which sends
    the recipient back to ``pending`` through its own step (the body must still be there)."""
    return {
        OutboxState.QUEUED: None,
        OutboxState.DELIVERED: RecipientState.DELIVERED,
        OutboxState.BOUNCED: RecipientState.BOUNCED,
        OutboxState.CANCELLED: RecipientState.CANCELLED,
        OutboxState.RESEAL: None,
    }[outbox_state]


# --- the diagram ---------------------------------------------------------------------------


def mermaid(machine: Machine) -> str:
    """The machine as a Mermaid ``stateDiagram-v2`` (what docs/queues.md must contain)."""
    lines = ["stateDiagram-v2"]
    for t in machine.transitions:
        lines.append(f"    {t.source or '[*]'} --> {t.target} : {t.event}")
    for s in machine.states:
        if s in machine.purged:
            lines.append(f"    {s} --> [*] : purged")
    return "\n".join(lines)
