"""``GET /v1/device/pending-mail`` (protocol §17.3): the pending list and the envelopes of
its first messages in one answer.  What the inbox chooses to carry, and what a device
accepts: frames only for listed messages, in list order, at the listed sizes, within what
it asked for; anything else is refused whole, and a 404 (an older inbox) means "ask
``pending``"."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from onionpost.core.errors import PeerProtocolError
from onionpost.core.wire import (
    PENDING_LIST_MAX,
    first_that_fit,
    message_frame_head,
    pending_list_head,
)
from onionpost.net.client import DeviceSession, Response
from onionpost.store.db import Database
from onionpost.store.inbox import InboxStore


def test_the_first_messages_that_fit_are_carried_in_order() -> None:
    sizes = [(1, 10), (2, 20), (3, 5), (4, 1)]
    assert first_that_fit(sizes, 16, 100) == [1, 2, 3, 4]
    assert first_that_fit(sizes, 2, 100) == [1, 2]
    # it stops at the first that does not fit: 3 and 4 would, but 2 is ahead of them
    assert first_that_fit(sizes, 16, 15) == [1]
    assert first_that_fit(sizes, 16, 5) == []
    assert first_that_fit(sizes, 0, 100) == []
    assert first_that_fit([], 16, 100) == []


class _Canned:
    """An inbox client that answers every request with one status and body."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status, self.body = status, body
        self.paths: list[str] = []

    async def request(self, method: str, path: str, **kw: Any) -> Response:
        self.paths.append(path)
        sink = kw.get("sink")
        if sink is not None and self.status == 200:
            sink.write(self.body)
            return Response(200, b"")
        return Response(self.status, self.body)


def _session(status: int, body: bytes) -> tuple[DeviceSession, _Canned]:
    canned = _Canned(status, body)
    session = DeviceSession(
        canned,  # type: ignore[arg-type]
        mailbox_id=b"m" * 16,
        device_id=b"d" * 16,
        sign=lambda b: b"",
        login_message=lambda b: b"",
    )
    session._token = b"t" * 32  # logged in
    return session, canned


def _answer(listed: list[tuple[int, int]], frames: list[tuple[int, bytes]]) -> bytes:
    text = json.dumps(
        {
            "messages": [{"id": i, "size": n, "received_at": 1} for i, n in listed],
            "device_list_version": 2,
        }
    ).encode()
    out = pending_list_head(len(text)) + text
    for spool_id, envelope in frames:
        out += message_frame_head(spool_id, len(envelope)) + envelope
    return out


async def _ask(body: bytes, *, count: int = 16, limit: int = 100) -> tuple[Any, dict[int, bytes]]:
    session, _ = _session(200, body)
    sinks: dict[int, io.BytesIO] = {}
    got = await session.pending_mail(
        wait=0, count=count, limit=limit, sink=lambda i: sinks.setdefault(i, io.BytesIO())
    )
    return got, {i: s.getvalue() for i, s in sinks.items()}


async def test_a_well_formed_answer_gives_the_list_and_the_envelopes() -> None:
    got, envelopes = await _ask(_answer([(7, 3), (9, 4), (12, 2)], [(7, b"abc"), (12, b"zz")]))
    listed, carried = got
    assert [(m.id, m.size) for m in listed] == [(7, 3), (9, 4), (12, 2)]
    assert carried == [7, 12] and envelopes == {7: b"abc", 12: b"zz"}
    got, envelopes = await _ask(_answer([], []))
    assert got == ([], []) and envelopes == {}


@pytest.mark.parametrize(
    ("body", "count", "limit"),
    [
        (_answer([(7, 3)], [(8, b"abc")]), 16, 100),  # not in the list
        (_answer([(7, 3), (9, 3)], [(9, b"abc"), (7, b"abc")]), 16, 100),  # out of order
        (_answer([(7, 3)], [(7, b"abc"), (7, b"abc")]), 16, 100),  # twice
        (_answer([(7, 3)], [(7, b"abcd")]), 16, 100),  # not the listed size
        (_answer([(7, 3), (9, 3)], [(7, b"abc"), (9, b"abc")]), 1, 100),  # more than asked
        (_answer([(7, 3), (9, 3)], [(7, b"abc"), (9, b"abc")]), 16, 5),  # larger than asked
        (_answer([(7, 3)], [(7, b"abc")])[:-1], 16, 100),  # cut short
        (_answer([(7, 3)], [(7, b"abc")]) + b"\0", 16, 100),  # something after
        (pending_list_head(1000) + b"{}", 16, 100),  # a list longer than the body
        (b"\0\0", 16, 100),  # no head
        (pending_list_head(2) + b"[]", 16, 100),  # not the pending answer
    ],
)
async def test_a_malformed_answer_is_refused_whole(body: bytes, count: int, limit: int) -> None:
    with pytest.raises(PeerProtocolError):
        await _ask(body, count=count, limit=limit)


async def test_an_older_inbox_is_asked_for_the_list_alone_from_then_on() -> None:
    session, canned = _session(404, b'{"status": "permanent", "code": "5.0.0"}')
    assert await session.pending_mail(wait=0, count=16, limit=100, sink=io.BytesIO) is None
    assert await session.pending_mail(wait=0, count=16, limit=100, sink=io.BytesIO) is None
    assert len(canned.paths) == 1  # not asked again
    assert not session.pending_mail_served


def test_a_pending_list_names_the_oldest_up_to_its_bound() -> None:
    """A device with a long backlog is listed the oldest PENDING_LIST_MAX and asks again."""
    db = Database(":memory:", ("inbox",), record_key=b"k" * 32)
    try:
        mb, device = b"M" * 16, b"d" * 16
        store = InboxStore(db)
        store.add_mailbox(mailbox_id=mb, local="bob", uik_pk=b"u", binding=b"b", now=0)
        db.conn.execute(  # a device of the mailbox (its keys play no part in listing)
            "INSERT INTO devices (mailbox_id, device_id, name, dsk_seq, dsk_pk)"
            " VALUES (?, ?, 'laptop', 0, x'00')",
            (mb, device),
        )
        for i in range(PENDING_LIST_MAX + 5):
            store.accept_sealed(
                mailbox_id=mb,
                digest=i.to_bytes(32, "big"),
                size=1,
                source=io.BytesIO(b"x"),
                device_ids=[device],
                receipt="r",
                now=0,
                spool_until=100,
                dedup_until=100,
                quota_bytes=1 << 30,
            )
        listed = store.pending(mb, device)
        assert len(listed) == PENDING_LIST_MAX
        assert [e.spool_id for e in listed] == sorted(e.spool_id for e in listed)
        assert len(store.pending(mb, device, after=listed[-1].spool_id)) == 5
    finally:
        db.close()
