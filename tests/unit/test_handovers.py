"""The device's hand-over batcher against a recording session (fast; the real route is
tested in tests/integration/test_hand_overs.py), and the pure parsing of the route's body."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from onionpost.core.errors import MalformedData, PermanentDeliveryError, TemporaryDeliveryError
from onionpost.core.wire import (
    ASK_BATCHES_AGAIN_AFTER,
    BATCH_ENVELOPES,
    BATCHED_ENVELOPE_MAX,
    HandOverFields,
    delivery_frame_head,
    hand_overs_head,
    parse_hand_overs,
)
from onionpost.device.handovers import HandOvers


class Session:
    """Answers each hand-over with a row id (its key's number) after a turn of the loop;
    ``many`` is what ``submit_many`` does instead: None (no route), or an error to raise."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []
        self.many: Exception | bool | None = True
        self.gate = asyncio.Event()
        self.gate.set()

    async def submit(self, *, key: str, envelope: Any, **_: Any) -> int:
        self.requests.append([key])
        await self.gate.wait()
        return int(key)

    async def submit_many(self, items: list[tuple[HandOverFields, bytes]]) -> Any:
        self.requests.append([f.key for f, _ in items])
        await self.gate.wait()
        if isinstance(self.many, Exception):
            raise self.many
        if self.many is None:
            return None
        return [int(f.key) if f.key != "13" else MalformedData("no") for f, _ in items]


def fields(n: int) -> HandOverFields:
    return HandOverFields("bob@x.onion", bytes(16), 100, "", str(n))


def envelope(size: int = 10) -> tuple[io.BytesIO, int]:
    return io.BytesIO(b"e" * size), size


def batcher() -> tuple[HandOvers, Session]:
    session = Session()
    return HandOvers(session), session  # type: ignore[arg-type]


async def lone_then_together(h: HandOvers, s: Session, lone: int, *others: int) -> list[Any]:
    """``lone`` handed over while the inbox holds its answer back, then ``others`` while
    that request is out; each one's answer (or error), in that order."""
    s.gate.clear()
    first = asyncio.create_task(h.submit(fields(lone), envelope()))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(h.submit(fields(n), envelope())) for n in others]
    await asyncio.sleep(0)
    s.gate.set()
    return list(await asyncio.gather(first, *tasks, return_exceptions=True))


async def test_what_queues_while_a_request_is_out_goes_in_the_next() -> None:
    h, s = batcher()
    s.gate.clear()
    first = asyncio.create_task(h.submit(fields(1), envelope()))
    for _ in range(5):  # the runner's turns
        await asyncio.sleep(0)
    assert s.requests == [["1"]]  # a lone one goes at once, on its own
    rest = [asyncio.create_task(h.submit(fields(n), envelope())) for n in range(20, 38)]
    await asyncio.sleep(0)
    s.gate.set()
    assert await first == 1
    assert await asyncio.gather(*rest) == list(range(20, 38))
    assert s.requests[1] == [str(n) for n in range(20, 20 + BATCH_ENVELOPES)]
    assert s.requests[2] == [str(n) for n in range(20 + BATCH_ENVELOPES, 38)]


async def test_each_gets_its_own_answer_and_a_large_one_goes_alone() -> None:
    h, s = batcher()
    s.gate.clear()
    lone = asyncio.create_task(h.submit(fields(1), envelope()))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(h.submit(fields(n), envelope())) for n in (12, 13, 14)]
    large = asyncio.create_task(h.submit(fields(15), envelope(BATCHED_ENVELOPE_MAX + 1)))
    await asyncio.sleep(0)
    s.gate.set()
    done = await asyncio.gather(lone, *tasks, large, return_exceptions=True)
    assert done[0] == 1 and done[1] == 12 and done[3] == 14 and done[4] == 15
    assert isinstance(done[2], MalformedData)
    assert ["15"] in s.requests and ["12", "13", "14"] in s.requests


async def test_a_caller_that_gives_up_is_left_out_of_the_next_request() -> None:
    h, s = batcher()
    s.gate.clear()
    lone = asyncio.create_task(h.submit(fields(1), envelope()))
    await asyncio.sleep(0)
    a = asyncio.create_task(h.submit(fields(2), envelope()))
    b = asyncio.create_task(h.submit(fields(3), envelope()))
    await asyncio.sleep(0)
    a.cancel()
    s.gate.set()
    assert await lone == 1 and await b == 3
    assert s.requests == [["1"], ["3"]]


@pytest.mark.parametrize("temporary", [True, False])
async def test_a_refusal_of_the_whole_request(temporary: bool) -> None:
    """Temporary: every envelope hears it (each is retried, as a lone one would be).
    Permanent: they go one at a time, so each gets its own answer."""
    h, s = batcher()
    s.many = (
        TemporaryDeliveryError("busy", code="4.3.2")
        if temporary
        else PermanentDeliveryError("no", code="5.0.0")
    )
    done = await lone_then_together(h, s, 1, 2, 3)
    if temporary:
        assert done[0] == 1 and all(isinstance(d, TemporaryDeliveryError) for d in done[1:])
        assert s.requests == [["1"], ["2", "3"]]
    else:
        assert done == [1, 2, 3]
        assert s.requests == [["1"], ["2", "3"], ["2"], ["3"]]


async def test_an_inbox_without_the_route_is_asked_again_an_hour_later() -> None:
    h, s = batcher()
    s.many = None

    async def burst(*ns: int) -> list[int]:
        s.gate.clear()
        tasks = [asyncio.create_task(h.submit(fields(n), envelope())) for n in ns]
        await asyncio.sleep(0)
        s.gate.set()
        return list(await asyncio.gather(*tasks))

    assert await burst(1, 2, 3) == [1, 2, 3]
    assert s.requests == [["1", "2", "3"], ["1"], ["2"], ["3"]]
    s.requests.clear()
    assert await burst(4, 5) == [4, 5]
    assert s.requests == [["4"], ["5"]]  # no more batches...
    h._singles_until -= ASK_BATCHES_AGAIN_AFTER  # ...until an hour has passed
    s.requests.clear()
    s.many = True
    assert await burst(6, 7, 8) == [6, 7, 8]
    assert s.requests == [["6", "7", "8"]]


async def test_a_failure_that_is_no_refusal_reaches_each_caller_and_the_next_batch_goes() -> None:
    h, s = batcher()
    s.many = RuntimeError("a bug")
    done = await lone_then_together(h, s, 1, 2, 3)
    assert done[0] == 1 and all(isinstance(d, RuntimeError) for d in done[1:])
    s.many = True
    assert await lone_then_together(h, s, 4, 5, 6) == [4, 5, 6]
    assert s.requests[-1] == ["5", "6"]


async def test_closing_cancels_the_callers_still_waiting() -> None:
    h, s = batcher()
    s.gate.clear()
    lone = asyncio.create_task(h.submit(fields(1), envelope()))
    for _ in range(5):
        await asyncio.sleep(0)
    waiting = asyncio.create_task(h.submit(fields(2), envelope()))
    await asyncio.sleep(0)
    await h.close()
    for task in (lone, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    s.gate.set()
    assert await h.submit(fields(3), envelope()) == 3  # a device started again hands over


# -- the body of POST /v1/device/submissions --------------------------------------------------


def parse(body: bytes) -> list[tuple[HandOverFields, int, int]]:
    return parse_hand_overs(lambda at, n: body[at : at + n], len(body))


def test_a_body_parses_to_each_envelopes_fields_and_place() -> None:
    one, two = fields(1), fields(2)
    head = hand_overs_head([one, two])
    body = head + delivery_frame_head(3) + b"abc" + delivery_frame_head(1) + b"d"
    at = len(head) + 4
    assert parse(body) == [(one, at, 3), (two, at + 3 + 4, 1)]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\x00", "head's length"),
        (b"\x00\x00\x00\x09[]", "runs past the end"),
        (b"\x00\x01\x00\x01" + b" " * 65537, "too long"),
        (b"\x00\x00\x00\x02[{", "not JSON"),
        (b"\x00\x00\x00\x02{}", "1 to 64"),
        (b"\x00\x00\x00\x02[]", "1 to 64"),
        (b"\x00\x00\x00\x03[1]", "JSON object"),
        (hand_overs_head([fields(1)]).replace(b"00000000", b"zzzzzzzz"), "msg_id"),
        (hand_overs_head([fields(1), fields(2)]) + delivery_frame_head(1) + b"x", "1 follow"),
        (hand_overs_head([fields(1)]), "no envelope"),
        (hand_overs_head([fields(1)]) + delivery_frame_head(2) + b"x", "past the end"),
    ],
)
def test_a_malformed_body_names_what_is_wrong(body: bytes, words: str) -> None:
    with pytest.raises(MalformedData, match=words):
        parse(body)
