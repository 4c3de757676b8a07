"""A device hands its inbox the envelopes sealed together in one request
(``POST /v1/device/submissions``), over real HTTP on loopback, real SQLite, real sealing.

Each envelope keeps its own answer (queued row, or its own refusal), a malformed body is
refused whole, large envelopes go alone, an inbox without the route gets one request per
envelope and is asked again later, and a sealing pass holds few large messages at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from onionpost.core.errors import OnionpostError
from onionpost.core.wire import (
    ASK_BATCHES_AGAIN_AFTER,
    BATCHED_ENVELOPE_MAX,
    HandOverFields,
    delivery_frame_head,
    hand_overs_head,
)
from onionpost.device.submission import LARGE_AT_ONCE, LARGE_MESSAGE
from onionpost.inbox import api
from onionpost.net.client import DeviceSession
from onionpost.store.outbox import OutboxRow
from onionpost.testing.harness import AliceAndBob, compose
from onionpost.testing.harness import subjects as filed_subjects
from tests.integration.test_delivery_batching import Commits


class World(AliceAndBob):
    def submit(self, subject: str, body_bytes: int = 100) -> None:
        msg = EmailMessage()
        msg["From"], msg["To"] = str(self.alice.address), str(self.bob.address)
        msg["Subject"], msg["Message-ID"] = subject, f"<{subject.replace(' ', '.')}@test>"
        msg.set_content("x" * body_bytes)
        self.alice.submissions.submit(self.alice.user, [self.bob.address], msg.as_bytes())

    async def first_contact(self) -> None:
        """The first message through (keys fetched, a token granted), and filed."""
        self.alice.submissions.submit(
            self.alice.user, [self.bob.address], compose(self.alice, self.bob, "first")
        )
        await self.alice.submissions.process_due()
        await self.a.worker.run_due()
        assert await self.bob.device.sync() == 1

    @property
    def session(self) -> DeviceSession:
        return self.alice.device.session

    def rows(self) -> list[OutboxRow]:
        return self.a.inbox.outbox.rows(states=("queued", "delivered", "bounced"))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


class Requests:
    """alice's hand-over requests: the size of each ``submit`` (one envelope) and the
    number of envelopes of each ``submit_many``."""

    def __init__(self, session: DeviceSession, monkeypatch: pytest.MonkeyPatch) -> None:
        self.singles: list[int] = []
        self.batches: list[int] = []
        single, several = session.submit, session.submit_many

        async def submit(**kw: Any) -> int:
            envelope = kw["envelope"]
            self.singles.append(envelope[1] if isinstance(envelope, tuple) else len(envelope))
            return await single(**kw)

        async def submit_many(items: list[tuple[HandOverFields, bytes]]) -> Any:
            self.batches.append(len(items))
            return await several(items)

        monkeypatch.setattr(session, "submit", submit)
        monkeypatch.setattr(session, "submit_many", submit_many)


async def test_a_page_of_submissions_is_handed_over_in_a_few_requests(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.first_contact()
    requests = Requests(world.session, monkeypatch)
    for i in range(20):
        world.submit(f"mail {i}")
    await world.alice.submissions.process_due()
    # one envelope per message (bob's one device; alice has no other device to copy to)
    assert sum(requests.batches) + len(requests.singles) == 20
    # a few requests, not 20: what was sealed while one was out goes in the next (two or
    # three here: 16 + 4 or 14 + 2 + 4, as the loop happens to interleave the seals)
    assert len(requests.batches) + len(requests.singles) <= 6
    assert max(requests.batches) > 1
    assert world.alice.submissions.store.due(world.clock.now()) == {}
    assert len(world.rows()) == 21
    assert await world.a.worker.run_due() == 20
    assert await world.bob.device.sync() == 20
    assert sorted(filed_subjects(world.bob, "INBOX")) == sorted(
        ["first", *(f"mail {i}" for i in range(20))]
    )


async def test_a_large_envelope_is_handed_over_alone(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.first_contact()
    requests = Requests(world.session, monkeypatch)
    for i in range(5):
        world.submit(f"small {i}")
    world.submit("large", BATCHED_ENVELOPE_MAX + 10_000)
    await world.alice.submissions.process_due()
    assert sum(requests.batches) + len(requests.singles) == 6
    assert max(requests.singles) > BATCHED_ENVELOPE_MAX
    assert requests.batches  # the small ones went together
    assert await world.a.worker.run_due() == 6
    assert await world.bob.device.sync() == 6
    assert "large" in filed_subjects(world.bob, "INBOX")


def _fields(world: World, key: str, **changes: Any) -> HandOverFields:
    values: dict[str, Any] = {
        "destination": str(world.bob.address),
        "msg_id": bytes(16),
        "expires_at": world.clock.now() + 3600,
        "ref": "<x@test>",
        "key": key,
    }
    values.update(changes)
    return HandOverFields(**values)


async def test_each_hand_over_of_a_request_gets_its_own_answer(world: World) -> None:
    """Two good envelopes, one for a destination that is no address, one with an expiry a
    year away: two rows queued in one COMMIT, two refusals, in order; the same keys again
    are answered with the same rows."""
    await world.session.login()
    items = [
        (_fields(world, "k1"), b"envelope one"),
        (_fields(world, "k2", destination="nobody"), b"envelope two"),
        (_fields(world, "k3", expires_at=world.clock.now() + 365 * 86400), b"envelope three"),
        (_fields(world, "k4"), b"envelope four"),
    ]
    before = len(world.rows())
    commits = Commits(world.a.inbox.outbox.db)
    results = await world.session.submit_many(items)
    assert commits.stop() == 1
    assert results is not None
    one, two, three, four = results
    assert isinstance(one, int) and isinstance(four, int) and one != four
    assert isinstance(two, OnionpostError) and two.code.startswith("5")
    assert "expiry" in str(three) and isinstance(three, OnionpostError)
    assert not three.temporary
    assert len(world.rows()) == before + 2
    assert world.a.inbox.outbox.envelope(one) == b"envelope one"
    assert world.a.inbox.outbox.envelope(four) == b"envelope four"
    again = await world.session.submit_many([items[3], items[0]])
    assert again == [four, one]
    assert len(world.rows()) == before + 2


def _body(fields: list[HandOverFields], envelopes: list[bytes]) -> bytes:
    return hand_overs_head(fields) + b"".join(delivery_frame_head(len(e)) + e for e in envelopes)


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "short-head",
        "head-past-end",
        "not-json",
        "not-a-list",
        "no-items",
        "bad-field",
        "fewer-envelopes",
        "more-envelopes",
        "trailing-bytes",
        "too-many",
    ],
)
async def test_a_malformed_hand_over_body_is_refused_whole(world: World, case: str) -> None:
    await world.session.login()
    f = _fields(world, "m")
    good = _body([f, _fields(world, "n")], [b"one", b"two"])
    bodies = {
        "empty": b"",
        "short-head": b"\x00\x00",
        "head-past-end": b"\x00\x01\x00\x00[]",
        "not-json": b"\x00\x00\x00\x03[{x" + delivery_frame_head(1) + b"x",
        "not-a-list": b"\x00\x00\x00\x02{}" + delivery_frame_head(1) + b"x",
        "no-items": b"\x00\x00\x00\x02[]",
        "bad-field": _body([_fields(world, "m", msg_id=b"")], [b"x"]).replace(
            b'"msg_id":""', b'"msg_id":"zz"'
        ),
        "fewer-envelopes": _body([f, _fields(world, "n")], [b"one"]),
        "more-envelopes": _body([f], [b"one", b"two"]),
        "trailing-bytes": good + b"\x00\x00",
        "too-many": _body([_fields(world, str(i)) for i in range(65)], [b"x"] * 65),
    }
    before = len(world.rows())
    r = await world.session._authorized(
        "POST", "/v1/device/submissions", again=False, body=bodies[case]
    )
    assert r.status == 400, r.body
    assert b'"5.' in r.body
    assert len(world.rows()) == before


async def test_hand_overs_past_the_limit_are_refused_before_they_are_read(world: World) -> None:
    await world.session.login()
    r = await world.session._authorized(
        "POST", "/v1/device/submissions", again=False, body=b"\x00" * (api.MAX_HAND_OVERS_BYTES + 1)
    )
    assert r.status == 413


async def test_an_inbox_without_the_route_gets_one_at_a_time_and_is_asked_again_later(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    await world.first_contact()

    async def no_route(server: api.InboxServer, request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    monkeypatch.setattr(api.InboxServer, "submissions", no_route)
    await world.a.stop()
    await world.a.start(worker=False)  # its routes are bound anew, the batch one refusing
    requests = Requests(world.session, monkeypatch)
    for i in range(6):
        world.submit(f"old {i}")
    await world.alice.submissions.process_due()
    asked = len(requests.batches)
    assert asked >= 1 and len(requests.singles) == 6  # every envelope went alone
    for i in range(3):
        world.submit(f"later {i}")
    await world.alice.submissions.process_due()
    assert len(requests.batches) == asked and len(requests.singles) == 9
    # an hour on, the inbox (upgraded meanwhile) is asked again
    monkeypatch.undo()
    requests = Requests(world.session, monkeypatch)
    await world.a.stop()
    await world.a.start(worker=False)
    world.alice.device.sender.hand_overs._singles_until -= ASK_BATCHES_AGAIN_AFTER
    for i in range(6):
        world.submit(f"new {i}")
    await world.alice.submissions.process_due()
    assert requests.batches and sum(requests.batches) + len(requests.singles) == 6
    assert await world.a.worker.run_due() == 15
    assert await world.bob.device.sync() == 15
    assert len(filed_subjects(world.bob, "INBOX")) == 16


async def test_a_sealing_pass_holds_few_large_messages_at_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small messages are sealed many at a time, large ones (read whole into memory to be
    sealed) at most LARGE_AT_ONCE at a time."""
    await world.first_contact()
    subs = world.alice.submissions
    process = subs._process
    sizes = {}
    in_flight: list[int] = []
    most_large = most = 0

    async def watched(sid: int, *args: Any) -> None:
        nonlocal most, most_large
        in_flight.append(sid)
        most = max(most, len(in_flight))
        most_large = max(most_large, sum(sizes[s] > LARGE_MESSAGE for s in in_flight))
        try:
            await asyncio.sleep(0.01)  # let the others of the page start meanwhile
            await process(sid, *args)
        finally:
            in_flight.remove(sid)

    monkeypatch.setattr(subs, "_process", watched)
    for i in range(LARGE_AT_ONCE + 3):
        world.submit(f"large {i}", LARGE_MESSAGE + 1000)
    for i in range(6):
        world.submit(f"small {i}")
    for sid in subs.store.due(world.clock.now()):
        sizes[sid] = subs.store.message_size(sid)
    assert sum(s > LARGE_MESSAGE for s in sizes.values()) == LARGE_AT_ONCE + 3
    await subs.process_due()
    assert most_large == LARGE_AT_ONCE
    assert most > LARGE_AT_ONCE
    assert await world.a.worker.run_due() == LARGE_AT_ONCE + 9
    assert await world.bob.device.sync() == LARGE_AT_ONCE + 9
