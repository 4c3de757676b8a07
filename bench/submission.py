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
    measure_postfix,
    onionpost_node,
    onionpost_smtp,
    report_smtp,
)
from bench.harness import Context

_COMMITS = re.compile(r"submit-commit: (\d+) items in (\d+) commits")


def run(ctx: Context) -> None:
    sizes = Sizes(smtp_messages=200 if ctx.quick else 3000, folder=0, imap_passes=0)
    refs = References.find(quick=ctx.quick)
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-submit-") as d:
        root = Path(d)
        root.chmod(0o755)  # Postfix runs its workers as other users
        with onionpost_node(root / "node") as node:
            onion = onionpost_smtp(node, sizes.smtp_messages)
        # The node logs its group commit's totals as it stops (onionpost.groupcommit).
        totals = _COMMITS.findall((root / "onionpost-node.log").read_text(errors="replace"))
        postfix = measure_postfix(root / "postfix", sizes, refs) if refs.postfix else None
    report_smtp(ctx, sizes, onion, postfix, refs)
    if totals:
        items, commits = (int(v) for v in totals[-1])
        ctx.figure(
            "submissions per durable commit",
            f"{items / commits:.2f}",
            extra=f"{items} submissions (with the warm-up) in {commits} commits, "
            "each one WAL fsync",
        )
