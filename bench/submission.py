"""SMTP submission alone: the gateway section's SMTP rows, without its IMAP and LMTP parts.

``python -m bench --only submission`` starts a fresh node and a private Postfix exactly as
:mod:`bench.gateway` does and runs the same SMTP load against both (10 sessions of 4 KiB
messages, each 250 only after the durable commit), in a fraction of the gateway section's
time: the loop to use while working on the submission path.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from bench.gateway import (
    References,
    Sizes,
    compare_smtp,
    onionpost_node,
    postfix_server,
    report_smtp,
)
from bench.harness import Context

_COMMITS = re.compile(r"submit-commit: (\d+) items in (\d+) commits")


#: The commit path alone: submissions stored by this many concurrent writers.
WRITERS = 10


def run(ctx: Context) -> None:
    _commit_path(ctx, 200 if ctx.quick else 2000)
    sizes = Sizes(smtp_messages=200 if ctx.quick else 6000, folder=0, imap_passes=0)
    refs = References.find(quick=ctx.quick)
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-submit-") as d:
        root = Path(d)
        root.chmod(0o755)  # Postfix runs its workers as other users
        with (
            postfix_server(root / "postfix", refs) as postfix,
            onionpost_node(root / "node") as node,
        ):
            smtp = compare_smtp(node, postfix, sizes.smtp_messages)
        # The node logs its group commit's totals as it stops (onionpost.base.groupcommit).
        totals = _COMMITS.findall((root / "onionpost-node.log").read_text(errors="replace"))
    report_smtp(ctx, sizes, smtp, refs)
    if totals:
        items, commits = (int(v) for v in totals[-1])
        ctx.figure(
            "submissions per durable commit",
            f"{items / commits:.2f}",
            extra=f"{items} submissions (with the warm-up) in {commits} commits, "
            "each one WAL fsync",
        )


def _commit_path(ctx: Context, count: int) -> None:
    """The durable store of a submission without SMTP and without the node's background
    work: one transaction (and its fsyncs) per message on the caller's thread, as the
    gateway did, against :class:`GroupCommit` with :data:`WRITERS` concurrent writers, as it
    does now; and, for the record, the spool file a Sent copy used to get."""
    import asyncio
    import threading
    import time

    from nacl.signing import SigningKey

    from bench.gateway import submission
    from onionpost.base.groupcommit import GroupCommit
    from onionpost.core.address import Address, onion_from_public_key
    from onionpost.device.submission import queue_submission
    from onionpost.store import DEVICE_COMPONENTS
    from onionpost.store.db import Database
    from onionpost.store.filing import FilingStore

    key = SigningKey.generate().verify_key.encode()
    to = Address.parse(f"bob@{onion_from_public_key(key)}.onion")
    messages = [submission("alice@example.onion", str(to), i) for i in range(count)]

    def store(db: Database, filing: FilingStore, message: bytes) -> int:
        return queue_submission(
            db, filing=filing, user="alice", recipients=[to], message=message,
            now=int(time.time()), lifetime=86_400,
        )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="onionpost-bench-commit-") as d:
        root = Path(d)
        db = Database(root / "device.db", DEVICE_COMPONENTS)
        filing = FilingStore(db, root / "filing")
        t0 = time.perf_counter()
        for m in messages:
            store(db, filing, m)
        one_by_one = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i, m in enumerate(messages):  # what the Sent copy cost before: its spool file
            filing._write_spool(i.to_bytes(16, "big"), m)
        spool = time.perf_counter() - t0

        lock = threading.Lock()
        loop_db = Database(root / "device.db", DEVICE_COMPONENTS, write_lock=lock)
        commit_db = Database(root / "device.db", DEVICE_COMPONENTS, write_lock=lock)
        commit_filing = FilingStore(commit_db, root / "filing")

        def commit(batch: list[bytes]) -> list[int | BaseException]:
            with commit_db.transaction():
                return [store(commit_db, commit_filing, m) for m in batch]

        async def grouped() -> tuple[float, float]:
            group: GroupCommit[bytes, int] = GroupCommit(commit, name="bench-commit")
            pending = list(messages)

            async def writer() -> None:
                while pending:
                    await group.submit(pending.pop())

            t0 = time.perf_counter()
            await asyncio.gather(*(writer() for _ in range(WRITERS)))
            seconds = time.perf_counter() - t0
            await group.close()
            return seconds, group.items / group.commits

        together, per_commit = asyncio.run(grouped())
        for x in (db, loop_db, commit_db):
            x.close()
    ctx.heading(
        f"Submission commit path alone: {count} submissions of 4.0 KiB stored durably "
        "(submission, body and Sent copy in one transaction, WAL + synchronous=FULL), no SMTP, "
        "no background work"
    )
    ctx.figure(
        "one commit per submission",
        f"{count / one_by_one:.0f} /s",
        extra=f"{one_by_one / count * 1e3:.2f} ms each, on the caller's thread",
    )
    ctx.figure(
        f"group commit, {WRITERS} writers",
        f"{count / together:.0f} /s",
        extra=f"x{one_by_one / together:.1f}; {per_commit:.1f} submissions per commit, "
        "in the commit thread",
    )
    ctx.figure(
        "a Sent copy's spool file (before)",
        f"{spool / count * 1e3:.2f} ms",
        extra="write, fsync, rename, fsync of the directory: what each submission also paid",
    )
