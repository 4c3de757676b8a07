"""`onionpost demo` shows a message crossing onion services, step by step (on the test network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from onionpost.app import demo
from onionpost.testing.tornet import TorNetwork

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_demo_runs_through_every_step(tor_network: TorNetwork, mail_tmp: Path) -> None:
    lines: list[str] = []
    await demo.run(lines.append, mail_tmp, network=tor_network)
    text = "\n".join(lines)
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in text
    assert text.count("onion service published") == 2
    assert "Subject: Hello Bob" in text and "Subject: Re: Hello Bob" in text
    assert text.count("X-Onionpost-Verified:") == 2
    assert "delivered to bob's inbox over its onion service" in text
