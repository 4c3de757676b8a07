"""What is still on its way, read from both queues one way for every audience.

`onionpost queue` lists through :func:`waiting`; `onionpost status` and the running node's
status file count through :func:`counts`, the same stages by the same rules in SQL (a unit
test holds the two equal), so they cannot disagree about how much mail is not delivered yet.

Mail waits in one of two tables.  The device's submission queue holds what is not sealed yet
("waiting for keys": the recipient's keys could not be had, or this node's tor is not up).
The inbox's outbox holds sealed copies, one per destination inbox: "queued" until the first
try, "deferred" after a failed one.  On a machine with both roles a sealed submission stays in
the submission queue (state 'queued') until its outcome comes back, so it is counted once,
as its outbox row.  On a gateway-only machine the outbox is on another machine; such a
submission is listed as "at the inbox" with what that inbox last reported.

The outbox keeps no recipient address (only the destination inbox's onion, see
docs/threat-model.md), so an outbox row's recipient comes from this device's submission
queue; a row handed over by another device shows only the destination inbox, ``?@<onion>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from onionpost.store.outbox import OutboxStore
from onionpost.store.submissions import SubmissionStore

WAITING_FOR_KEYS = "waiting for keys"
QUEUED = "queued"
DEFERRED = "deferred"
AT_THE_INBOX = "at the inbox"
#: Every stage, in the order a message passes through them.
STAGES = (WAITING_FOR_KEYS, QUEUED, DEFERRED, AT_THE_INBOX)
#: How a message can leave the queue.
OUTCOMES = ("delivered", "bounced", "cancelled")


@dataclass(frozen=True)
class QueueItem:
    id: str  # "s12": a submission not sealed yet (or at a remote inbox); "o7": an outbox row
    user: str
    recipient: str
    stage: str  # one of STAGES
    created_at: int
    attempts: int
    next_attempt_at: int
    last_error: str | None
    state: str


def waiting(
    submissions: SubmissionStore | None,
    outbox: OutboxStore | None,
    users: Mapping[bytes, str],
) -> list[QueueItem]:
    """Every message not delivered yet, oldest first.  ``users`` names mailbox ids."""
    items: list[QueueItem] = []
    # outbox row -> (user, address) this device handed it over for
    recipients = submissions.outbox_recipients() if submissions is not None else {}
    for r in submissions.listing() if submissions is not None else []:
        if r.state == "queued" and outbox is not None:
            continue  # its outbox row below stands for it
        items.append(
            QueueItem(
                f"s{r.submission_id}",
                r.user,
                r.address,
                WAITING_FOR_KEYS if r.state == "pending" else AT_THE_INBOX,
                r.created_at,
                r.attempts,
                r.next_attempt_at,
                r.last_error,
                r.state,
            )
        )
    for row in outbox.rows() if outbox is not None else []:
        user = users.get(row.mailbox_id, "?")
        mine = recipients.get(row.id)
        items.append(
            QueueItem(
                f"o{row.id}",
                user,
                mine[1] if mine is not None and mine[0] == user else f"?@{row.onion}.onion",
                DEFERRED if row.attempts else QUEUED,
                row.created_at,
                row.attempts,
                row.next_attempt_at,
                row.last_error,
                row.state,
            )
        )
    return sorted(items, key=lambda i: (i.created_at, i.id))


def summary(items: list[QueueItem]) -> dict[str, int]:
    """How many items are in each stage, and ``total``."""
    counts = dict.fromkeys(STAGES, 0)
    for item in items:
        counts[item.stage] = counts.get(item.stage, 0) + 1
    counts["total"] = len(items)
    return counts


def counts(submissions: SubmissionStore | None, outbox: OutboxStore | None) -> dict[str, int]:
    """``summary(waiting(...))`` counted by SQLite: the same stages by the same rules, with
    no row read.  The running node writes this into its status file every few seconds; with
    10,000 messages deferred, listing them cost ~170 ms of CPU each time (docs/performance.md,
    "Idle cost of a backlog")."""
    out = dict.fromkeys(STAGES, 0)
    if submissions is not None:
        by_state = submissions.waiting_counts()
        out[WAITING_FOR_KEYS] = by_state.get("pending", 0)
        if outbox is None:  # sealed and handed to an inbox on another machine
            out[AT_THE_INBOX] = by_state.get("queued", 0)
    if outbox is not None:
        out[QUEUED], out[DEFERRED] = outbox.waiting_counts()
    out["total"] = sum(out[stage] for stage in STAGES)
    return out


def finished(
    submissions: SubmissionStore | None,
    outbox: OutboxStore | None,
    *,
    since: int,
    user: str | None = None,
    mailbox_id: bytes | None = None,
) -> dict[str, int]:
    """How many left the queue since ``since``, by outcome (delivered, bounced, cancelled).

    Counted the way :func:`waiting` lists them: outbox rows where this machine has the
    outbox, plus submissions that never reached it (cancelled or bounced before sealing).
    A copy handed back for re-sealing (the recipient's keys changed) is not an outcome.
    ``user`` and ``mailbox_id`` narrow it to one person's mail.
    """
    counts = dict.fromkeys(OUTCOMES, 0)
    if submissions is not None:
        for state, n in submissions.outcomes(since=since, sealed=outbox is None, user=user):
            if state in counts:
                counts[state] += n
    if outbox is not None:
        for state, n in outbox.outcomes(since=since, mailbox_id=mailbox_id):
            if state in counts:
                counts[state] += n
    return counts
