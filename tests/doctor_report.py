"""Reading ``onionpost doctor``'s report in tests.

The disk check reports the free space of the machine the tests run on.  A CI host with less
than a GiB free is no fault of the node under test, so a test asks which checks were flagged
and accepts the disk's among them; the disk check itself has its own unit test.
"""

from __future__ import annotations

HOST_DEPENDENT = frozenset({"disk"})


def flagged(report: str) -> list[str]:
    """The names of the checks the report marks ``!!``, in order."""
    return [line[4:18].strip() for line in report.splitlines() if line.startswith("!!  ")]


def flagged_beyond_host(report: str) -> list[str]:
    """The flagged checks other than those that depend on the machine running the tests."""
    return [name for name in flagged(report) if name not in HOST_DEPENDENT]
