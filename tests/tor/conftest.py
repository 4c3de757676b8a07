"""The tor tier: one private Tor network per test run, shared by every test here."""

from __future__ import annotations

import pytest

from tests.tor.network import (
    TIMINGS,
    http_target,
    tor_client,
    tor_launcher,
    tor_network,
)

__all__ = ["http_target", "tor_client", "tor_launcher", "tor_network"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/tor/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.tor)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("tor timings (seconds)")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:<40} {seconds:7.2f}")
