"""onionpost benchmarks: ``python -m bench`` (``make bench``).

A *section* is a module of this package with a ``run(ctx: bench.harness.Context) -> None``
function.  Adding one is one file plus one line in :data:`SECTIONS`; sections are imported
only when they run, so a section that needs tor or a mail client costs nothing to the others.

Every speed figure is printed next to a named reference measured in the same run (a raw
libsodium call, one hash, one scalar multiplication...): absolute numbers say more about the
machine than about onionpost, the ratio is the figure that means something across machines.
"""

from __future__ import annotations

#: section name -> module that implements it, in the order a full run prints them.
SECTIONS: dict[str, str] = {
    "crypto": "bench.crypto",
    "delivery": "bench.delivery",
    "gateway": "bench.gateway",
    "submission": "bench.submission",  # the gateway section's SMTP rows alone
    "queue": "bench.queue",
    "tor": "bench.tor",
    "memory": "bench.memory",
    "growth": "bench.growth",  # delivery rate and RSS against mailbox size; the crypto pool
    # "scheduler": "bench.scheduler",
    # "smtp": "bench.smtp",
    # "imap": "bench.imap",
}
