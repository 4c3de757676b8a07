"""The tor benchmark section runs (quick mode, on the test network); no timing is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import tor as tor_bench
from bench.harness import Context
from onionpost.testing.tornet import TorNetwork

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_tor_bench_section_runs(
    tor_network: TorNetwork, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await tor_bench.measure(Context(quick=True), tor_network, tmp_path)
    out = capsys.readouterr().out
    for needle in (
        "raw onion echo",
        "API round trip",
        "cold (first contact)",
        "warm",
        "delivered over tor",
        "filed on bob's device",
    ):
        assert needle in out, out
