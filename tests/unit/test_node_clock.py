"""The node waits on its Clock: tor's start is retried on the clock the node was given, so a
FakeClock moves through the backoff without any real waiting."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from onionpost.app import node as node_module
from onionpost.app.node import Node
from onionpost.base.clock import FakeClock
from onionpost.base.config import Config, DeliveryConfig
from onionpost.core.errors import TorError, TorNotInstalled, TorNotRunning


async def test_tor_start_is_retried_on_the_nodes_clock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock(1_800_000_000)
    attempts: list[int] = []
    answers: list[TorError] = [TorNotRunning(), TorNotRunning(), TorNotInstalled()]

    async def start(*args: Any, **kwargs: Any) -> None:
        attempts.append(clock.now())
        raise answers[len(attempts) - 1]

    monkeypatch.setattr(node_module.TorRuntime, "start", start)
    node = Node(Config(data_dir=tmp_path), clock=clock)
    task = asyncio.create_task(node._tor_supervisor())

    async def settle() -> None:
        for _ in range(20):
            await asyncio.sleep(0)

    await settle()
    assert attempts == [1_800_000_000]  # then it waits 15 s on the clock, not in real time
    clock.advance(14)
    await settle()
    assert len(attempts) == 1
    clock.advance(1)
    await settle()
    assert attempts[1:] == [1_800_000_015]
    clock.advance(30)  # the backoff doubled
    await settle()
    assert attempts[2:] == [1_800_000_045]
    await asyncio.wait_for(task, 5)  # a permanent error ends the supervisor
    assert isinstance(node._tor_failure, TorNotInstalled)


def test_the_node_keeps_as_many_connections_per_inbox_as_it_delivers_at_once(
    tmp_path: Path,
) -> None:
    """The pool keeps what the outbox uses at once: with fewer kept, every pass of a burst
    to one inbox would close the extra streams and open them again."""
    config = dataclasses.replace(Config(data_dir=tmp_path), delivery=DeliveryConfig(concurrency=5))
    assert Node(config).connections.max_idle == 5
