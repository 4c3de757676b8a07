"""The delivery and queue benchmark sections run in quick mode (correctness only: they run and
print their figures; no timing is judged here)."""

from __future__ import annotations

import pytest

from bench.__main__ import main


def test_delivery_section_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--only", "delivery"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "== delivery",
        "harness loops, burst of",
        "vs crypto only (seal + open x3)",
        "latency to first device, p50 / p99",
        "latency to all three devices, p50 / p99",
        "vs one durable SQLite commit",
        "CPU per message",
        "Node sender, burst of",
    ):
        assert expected in out, expected
    assert "TIMED OUT" not in out


def test_queue_section_quick(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--only", "queue"]) == 0
    out = capsys.readouterr().out
    for expected in (
        "== queue",
        "backlog built",
        "drain: all delivered to inbox B",
        "drain: all filed on bob's device",
        "vs inbox up from the start",
        "100 envelopes spooled",
        "vs an empty spool",
        "Node (tor off, no gateway), idle",
        "vs idle asyncio loop",
    ):
        assert expected in out, expected
