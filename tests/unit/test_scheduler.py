"""The scheduler runs on the clock it is given: under a FakeClock, ticks come when the clock
is moved and never from real time passing, so tests drive the node's own jobs."""

from __future__ import annotations

import asyncio

from onionpost.base.clock import FakeClock
from onionpost.base.scheduler import Scheduler
from onionpost.core.errors import OnionpostError


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_ticks_follow_the_clock_not_real_time() -> None:
    clock = FakeClock(1_000)
    s = Scheduler(clock)
    runs: list[int] = []

    async def job() -> None:
        runs.append(clock.now())

    s.every("j", 30, job, start_in=5)
    s.start()
    try:
        await settle()
        assert runs == []
        clock.advance(4)
        await settle()
        assert runs == []
        clock.advance(1)
        await settle()
        assert runs == [1_005]
        assert s.due_in("j") == 30
        clock.advance(30)
        await settle()
        assert runs == [1_005, 1_035]
        clock.advance(95)  # three ticks missed: they coalesce into one run
        await settle()
        assert runs == [1_005, 1_035, 1_130]
        assert s.due_in("j") == 30  # counted from this run's start
    finally:
        await s.stop()


async def test_wake_runs_now_and_a_wake_during_a_run_runs_once_more() -> None:
    clock = FakeClock(1_000)
    s = Scheduler(clock)
    gate = asyncio.Event()
    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await gate.wait()

    s.every("j", 3600, job, start_in=3600)
    s.wake("j")  # before start: runs as soon as it starts
    s.wake("nothing")  # an unknown job: nothing happens
    s.start()
    try:
        await settle()
        assert runs == 1 and s.due_in("j") is None  # running
        s.wake("j")
        s.wake("j")  # many wake-ups while running: one more run
        gate.set()
        await settle()
        assert runs == 2
        await settle()
        assert runs == 2
    finally:
        await s.stop()


async def test_a_failing_job_keeps_its_schedule() -> None:
    clock = FakeClock(1_000)
    s = Scheduler(clock)
    calls: list[str] = []

    async def failing() -> None:
        calls.append("x")
        if len(calls) == 1:
            raise OnionpostError("temporary trouble")
        raise RuntimeError("a bug")

    s.every("j", 10, failing)
    s.start()
    try:
        await settle()
        clock.advance(10)
        await settle()
        clock.advance(10)
        await settle()
        assert calls == ["x", "x", "x"]
    finally:
        await s.stop()


async def test_stop_cancels_a_running_job_and_a_job_added_later_runs() -> None:
    clock = FakeClock(1_000)
    s = Scheduler(clock)
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    s.start()
    s.every("slow", 60, slow)  # added after start (as the node adds "tor-health")
    assert s.names() == ["slow"]
    await settle()
    assert started.is_set()
    await s.stop()
    assert cancelled.is_set()
    assert s.due_in("slow") is None
