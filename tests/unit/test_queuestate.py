"""The queues' state machines (onionpost/core/queuestate.py): every legal and illegal step, the
diagram in docs/queues.md, the node API's vocabulary, and the stores keeping to the table."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from onionpost.core import queuestate as q
from onionpost.core.errors import IllegalTransition, StoreError
from onionpost.core.queuestate import OutboxState as O
from onionpost.core.queuestate import RecipientState as R
from onionpost.store.db import Database, available_migrations, record_hash
from onionpost.store.outbox import OutboxStore
from onionpost.store.submissions import SubmissionStore

DOC = Path(__file__).parents[2] / "docs" / "queues.md"

# The legal steps, written out here independently of the module: a change to the table
# must be made in both places (and in the diagram), on purpose.
OUTBOX_LEGAL = {
    (None, O.QUEUED),
    (O.QUEUED, O.QUEUED),
    (O.QUEUED, O.DELIVERED),
    (O.QUEUED, O.BOUNCED),
    (O.QUEUED, O.CANCELLED),
    (O.QUEUED, O.RESEAL),
    (O.RESEAL, O.QUEUED),
}
SUBMISSION_LEGAL = {
    (None, R.PENDING),
    (R.PENDING, R.PENDING),
    (R.PENDING, R.QUEUED),
    (R.PENDING, R.DELIVERED),
    (R.PENDING, R.BOUNCED),
    (R.PENDING, R.CANCELLED),
    (R.QUEUED, R.QUEUED),
    (R.QUEUED, R.PENDING),
    (R.QUEUED, R.DELIVERED),
    (R.QUEUED, R.BOUNCED),
    (R.QUEUED, R.CANCELLED),
}


def _every_step(machine: q.Machine, legal: set[tuple[str | None, str]]) -> list[object]:
    sources: list[str | None] = [None, *machine.states]
    return [
        pytest.param(machine, s, t, (s, t) in legal, id=f"{machine.name}:{s or 'new'}->{t}")
        for s in sources
        for t in machine.states
    ]


@pytest.mark.parametrize(
    ("machine", "source", "target", "legal"),
    _every_step(q.OUTBOX, OUTBOX_LEGAL) + _every_step(q.SUBMISSION, SUBMISSION_LEGAL),
)
def test_every_step(machine: q.Machine, source: str | None, target: str, legal: bool) -> None:
    if legal:
        t = machine.check(source, target)
        assert (t.source, t.target) == (source, target)
    else:
        with pytest.raises(IllegalTransition, match="cannot go from"):
            machine.check(source, target)


@pytest.mark.parametrize("machine", q.MACHINES, ids=lambda m: m.name)
def test_unknown_states_are_illegal(machine: q.Machine) -> None:
    with pytest.raises(IllegalTransition):
        machine.check("queued", "lost")
    with pytest.raises(IllegalTransition):
        machine.check("lost", "queued")


def test_illegal_transition_is_a_store_error() -> None:
    assert issubclass(IllegalTransition, StoreError)


@pytest.mark.parametrize(
    ("transitions", "final", "purged", "why"),
    [
        ([("a", "a", "x"), ("a", "a", "y")], set(), set(), "listed twice"),
        ([("a", "z", "x")], set(), set(), "unknown state"),
        ([("b", "a", "x")], {"b"}, {"b"}, "leaves a final state"),
        ([("a", "b", "x")], {"b"}, set(), "purged"),
    ],
)
def test_a_malformed_table_is_refused(
    transitions: list[tuple[str, str, str]], final: set[str], purged: set[str], why: str
) -> None:
    edges = tuple(q.Transition(*t) for t in transitions)
    with pytest.raises(ValueError, match=why):
        q.Machine("m", ("a", "b"), edges, frozenset(final), frozenset(purged))


# --- the diagram ---------------------------------------------------------------------------

_EDGE = re.compile(r"^\s*(\S+)\s*-->\s*(\S+)\s*(?::\s*(.*?))?\s*$")


def _diagrams() -> dict[str, set[tuple[str, str, str]]]:
    """The Mermaid blocks of docs/queues.md, by the table they claim to draw."""
    found: dict[str, set[tuple[str, str, str]]] = {}
    for block in re.findall(r"```mermaid\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S):
        name = re.search(r"%% table: (\w+)", block)
        assert name is not None, f"a diagram in {DOC.name} does not say which table it draws"
        edges = set()
        for line in block.splitlines():
            m = _EDGE.match(line)
            if m:
                edges.add((m.group(1), m.group(2), m.group(3) or ""))
        found[name.group(1)] = edges
    return found


def _table(machine: q.Machine) -> set[tuple[str, str, str]]:
    edges = {(t.source or "[*]", t.target, t.event) for t in machine.transitions}
    return edges | {(s, "[*]", "purged") for s in machine.purged}


@pytest.mark.parametrize("machine", q.MACHINES, ids=lambda m: m.name)
def test_the_diagram_draws_the_table(machine: q.Machine) -> None:
    diagrams = _diagrams()
    assert machine.name in diagrams, f"docs/queues.md has no diagram of the {machine.name}"
    assert diagrams[machine.name] == _table(machine)
    assert set(diagrams) == {m.name for m in q.MACHINES}


def test_the_generated_diagram_is_the_table() -> None:
    for machine in q.MACHINES:
        lines = q.mermaid(machine).splitlines()
        assert lines[0] == "stateDiagram-v2"
        edges = set()
        for line in lines[1:]:
            m = _EDGE.match(line)
            assert m is not None, line
            edges.add((m.group(1), m.group(2), m.group(3) or ""))
        assert edges == _table(machine)


def test_architecture_links_the_queues() -> None:
    assert "(queues.md)" in (DOC.parent / "architecture.md").read_text(encoding="utf-8")


# --- the node API's vocabulary -------------------------------------------------------------


@pytest.mark.parametrize(
    ("stored", "wire"),
    [
        (O.QUEUED, "queued"),
        (O.DELIVERED, "delivered"),
        (O.BOUNCED, "bounced"),
        (O.CANCELLED, "cancelled"),
        (O.RESEAL, "bounced"),  # with last_error_code 5.7.5, as it was always stored
    ],
)
def test_outbox_to_wire(stored: O, wire: str) -> None:
    assert q.outbox_to_wire(stored) == wire
    assert q.outbox_to_wire(stored.value) == wire


@pytest.mark.parametrize(
    ("state", "code", "read"),
    [
        ("queued", None, O.QUEUED),
        ("delivered", None, O.DELIVERED),
        ("bounced", "5.1.1", O.BOUNCED),
        ("bounced", None, O.BOUNCED),
        ("bounced", q.RESEAL_CODE, O.RESEAL),
        ("cancelled", None, O.CANCELLED),
        ("queued", q.RESEAL_CODE, O.QUEUED),  # only a bounce with the code is a re-seal
        ("reseal", q.RESEAL_CODE, O.RESEAL),  # a future inbox that says it plainly
        ("exploded", None, None),
        (None, None, None),
        (3, None, None),
    ],
)
def test_outbox_from_wire(state: object, code: object, read: O | None) -> None:
    assert q.outbox_from_wire(state, code) == read


@pytest.mark.parametrize(
    ("asked", "stored"),
    [
        (["queued"], ("queued",)),
        (["bounced"], ("bounced", "reseal")),
        (["delivered", "bounced", "bounced"], ("delivered", "bounced", "reseal")),
        (q.WIRE_OUTBOX_STATES, ("queued", "delivered", "bounced", "reseal", "cancelled")),
    ],
)
def test_outbox_states_from_wire(asked: list[str], stored: tuple[str, ...]) -> None:
    assert q.outbox_states_from_wire(asked) == stored


@pytest.mark.parametrize("asked", [["reseal"], ["pending"], [""], ["queued", "Queued"]])
def test_unknown_wire_states_are_refused(asked: list[str]) -> None:
    with pytest.raises(ValueError):
        q.outbox_states_from_wire(asked)


@pytest.mark.parametrize(
    ("outbox", "recipient"),
    [
        (O.QUEUED, None),
        (O.DELIVERED, R.DELIVERED),
        (O.BOUNCED, R.BOUNCED),
        (O.CANCELLED, R.CANCELLED),
        (O.RESEAL, None),
    ],
)
def test_recipient_outcome(outbox: O, recipient: R | None) -> None:
    assert q.recipient_outcome(outbox) == recipient
    if recipient is not None:  # every outcome is a legal step of a handed-over recipient
        q.SUBMISSION.check(R.QUEUED, recipient)


# --- the stores keep to the table ----------------------------------------------------------

KEY = b"k" * 32
MB = b"M" * 16
ONION = "a" * 56


def _enqueue(outbox: OutboxStore, key: str, envelope: bytes, now: int = 1) -> int:
    return outbox.enqueue(
        mailbox_id=MB,
        device_id=b"d" * 16,
        onion=ONION,
        envelope=envelope,
        submission_key=key,
        now=now,
        expires_at=10_000,
    )


def test_a_reseal_row_waits_for_its_new_envelope() -> None:
    db = Database(":memory:", ("outbox",), record_key=KEY)
    try:
        outbox = OutboxStore(db)
        row_id = _enqueue(outbox, "dev:s1", b"old")
        outbox.mark_reseal(row_id, now=5, error="stale keys")
        row = outbox.get(row_id)
        assert row is not None and (row.state, row.last_error_code) == ("reseal", "5.7.5")
        assert row.attempts == 1 and row.finished_at == 5 and row.onion == ""
        assert outbox.envelope(row_id) == b""
        assert outbox.outcomes(since=0) == []  # not an outcome
        assert outbox.claim_due(10, limit=9, lease=60) == []
        # the same key again: the re-sealing, back in the queue with its new envelope
        assert _enqueue(outbox, "dev:s1", b"new", now=7) == row_id
        row = outbox.get(row_id)
        assert row is not None and row.state == "queued" and row.last_error_code is None
        assert (row.onion, row.next_attempt_at, row.finished_at) == (ONION, 7, None)
        assert outbox.envelope(row_id) == b"new"
        # a finished row is not requeued by its key
        outbox.mark_delivered(row_id, now=8)
        assert _enqueue(outbox, "dev:s1", b"third", now=9) == row_id
        assert outbox.get(row_id).state == "delivered"  # type: ignore[union-attr]
        assert outbox.outcomes(since=0) == [("delivered", 1)]
    finally:
        db.close()


def test_the_worker_s_delivered_marks_are_committed_together() -> None:
    """The marks a delivery worker leaves (mark_delivered_later) go in as few statements as
    their times allow, more than one statement's worth of rows included: each row keeps
    its own time, loses its envelope, and a row that left the queue meanwhile is kept."""
    db = Database(":memory:", ("outbox",), record_key=KEY)
    try:
        outbox = OutboxStore(db)
        rows = [_enqueue(outbox, f"dev:m{i}", b"e%d" % i) for i in range(1203)]
        cancelled = rows[600]
        assert outbox.cancel(cancelled, now=2)
        outbox.mark_delivered_later(rows[:1000], now=5)
        outbox.mark_delivered_later(rows[1000:1200], now=6)
        outbox.flush_marks()
        assert outbox.marks_waiting() == 0 and sorted(outbox.committed()) == sorted(rows[:1200])
        for row_id in rows[:1200]:
            row = outbox.get(row_id)
            assert row is not None
            if row_id == cancelled:
                assert (row.state, row.finished_at, row.attempts) == ("cancelled", 2, 0)
                continue
            when = 5 if row_id in rows[:1000] else 6
            assert (row.state, row.finished_at, row.last_attempt_at) == ("delivered", when, when)
            assert (row.attempts, row.onion) == (1, "") and outbox.envelope(row_id) == b""
        for row_id in rows[1200:]:
            row = outbox.get(row_id)
            assert row is not None and row.state == "queued"
            assert outbox.envelope(row_id) == b"e%d" % rows.index(row_id)
        assert sorted(outbox.outcomes(since=0)) == [("cancelled", 1), ("delivered", 1199)]
    finally:
        db.close()


def test_a_step_from_a_state_the_row_left_changes_nothing() -> None:
    db = Database(":memory:", ("outbox",), record_key=KEY)
    try:
        outbox = OutboxStore(db)
        row_id = _enqueue(outbox, "dev:s2", b"x")
        assert outbox.cancel(row_id, now=2)
        outbox.mark_delivered(row_id, now=3)  # the delivery finished after the cancel
        outbox.mark_reseal(row_id, now=3, error="late")
        outbox.mark_deferred(row_id, now=3, next_attempt_at=9, error="e", code="4.0.0")
        row = outbox.get(row_id)
        assert row is not None and (row.state, row.finished_at, row.attempts) == ("cancelled", 2, 0)
        assert not outbox.cancel(row_id, now=4)
        assert outbox.purge_finished(3) == 1
    finally:
        db.close()


def test_the_submission_store_refuses_a_step_the_table_lacks() -> None:
    db = Database(":memory:", ("submissions",))
    try:
        store = SubmissionStore(db)
        sid = store.add(
            user="u", message=b"m", headers=b"", recipients=["r"], message_ref="",
            now=0, expires_at=99,
        )  # fmt: skip
        store.mark_queued(sid, "r", 5)
        for bad in ("pending", "queued", "reseal", "gone"):  # not outcomes of the outbox
            with pytest.raises(IllegalTransition):
                store.set_outcome(sid, "r", bad, None, None)
        assert store.reseal(sid, "r", 3)
        assert store.listing()[0].state == "pending"
        store.mark_queued(sid, "r", 6)
        store.set_outcome(sid, "r", R.BOUNCED, "no", "5.1.1")
        assert store.unnotified_bounces("u")[0].last_error_code == "5.1.1"
        assert not store.reseal(sid, "r", 4)  # bounced is final
        assert store.message(sid) == b""  # nothing left on its way: the body went
    finally:
        db.close()


# --- outbox 0004: the stored ('bounced', '5.7.5') rows become 'reseal' ---------------------


def test_an_old_outbox_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "inbox.db"
    conn = sqlite3.connect(path)
    conn.create_function("record_hash", 1, lambda v: record_hash(KEY, v), deterministic=True)
    conn.execute(
        "CREATE TABLE schema_migrations (component TEXT NOT NULL, version INTEGER NOT NULL,"
        " name TEXT NOT NULL, applied_at INTEGER NOT NULL, PRIMARY KEY (component, version))"
    )
    for version, name, sql in available_migrations("outbox"):
        if version <= 3:
            conn.executescript(sql)
            conn.execute(
                "INSERT INTO schema_migrations VALUES ('outbox', ?, ?, 0)", (version, name)
            )
    rows = [  # id, state, last_error_code, key
        (1, "queued", None, "dev:q"),
        (2, "bounced", "5.7.5", "dev:r"),
        (3, "bounced", "5.1.1", "dev:b"),
        (4, "delivered", None, "dev:d"),
    ]
    for rid, state, code, key in rows:
        conn.execute(
            "INSERT INTO outbox (id, mailbox_id, device_id, onion, submission_hash, created_at,"
            " expires_at, next_attempt_at, attempts, last_error_code, state, finished_at)"
            " VALUES (?, ?, x'00', ?, ?, 0, 10000, 0, 1, ?, ?, ?)",
            (
                rid, MB, ONION if state == "queued" else "", record_hash(KEY, key.encode()),
                code, state, None if state == "queued" else 3,
            ),
        )  # fmt: skip
    conn.execute("INSERT INTO outbox_envelopes VALUES (1, x'656e76')")
    conn.commit()
    conn.close()

    db = Database(path, ("outbox",), record_key=KEY)
    try:
        assert db.schema_version("outbox") == len(available_migrations("outbox"))
        outbox = OutboxStore(db)
        states = {r.id: (r.state, r.last_error_code) for r in outbox.rows(states=tuple(O))}
        assert states == {
            1: ("queued", None),
            2: ("reseal", "5.7.5"),
            3: ("bounced", "5.1.1"),
            4: ("delivered", None),
        }
        assert outbox.envelope(1) == b"env"  # the queued row kept its envelope
        assert db.scalar("PRAGMA foreign_key_check") is None
        assert _enqueue(outbox, "dev:r", b"resealed", now=5) == 2
        assert outbox.get(2).state == "queued"  # type: ignore[union-attr]
        assert sorted(outbox.outcomes(since=0)) == [("bounced", 1), ("delivered", 1)]
        # the envelopes still belong to their rows: deleting a row takes its envelope along
        outbox.cancel(1, now=6)
        assert outbox.envelope(1) == b""
        assert outbox.remove_mailbox(MB) == 4
        assert db.scalar("SELECT count(*) FROM outbox_envelopes") == 0
    finally:
        db.close()


# --- outbox 0005: a row id is never given out twice -------------------------------------------


def test_an_outbox_row_id_is_never_reused(tmp_path: Path) -> None:
    """The worker holds row ids in memory (deliveries in flight, delivered marks that ride
    the next commit): when the newest rows are deleted (a person removed), the next row
    queued must not take one of their ids, or an outcome meant for a deleted row would land
    on it."""
    db = Database(tmp_path / "inbox.db", ("outbox",), record_key=KEY)
    try:
        outbox = OutboxStore(db)

        def queue(mailbox: bytes, key: str) -> int:
            return outbox.enqueue(
                mailbox_id=mailbox, device_id=b"d" * 16, onion=ONION, envelope=b"env",
                submission_key=key, now=0, expires_at=10_000,
            )  # fmt: skip

        kept = queue(MB, "dev:kept")
        gone = queue(b"G" * 16, "dev:gone")
        assert outbox.remove_mailbox(b"G" * 16) == 1
        new = queue(MB, "dev:new")
        assert new > gone > kept
        # an outcome for the deleted row (the worker's, in memory) changes nothing
        outbox.mark_delivered(gone, now=5)
        outbox.mark_bounced(gone, now=5, error="gone", code="5.0.0", attempted=True)
        assert {r.id for r in outbox.rows()} == {kept, new}
        assert outbox.envelope(new) == b"env"
    finally:
        db.close()
