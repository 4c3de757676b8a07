"""The SMTP front's pair writes the frames of one turn of the event loop in one piece.

``gateway.smtpfront._FrameWriter``: the answers of one group commit (and the DATA marks of
the sessions they wake) left in one ``send`` each before; now in one for the turn.  Order is
kept, a message-sized frame is never joined (copied) with others, and nothing is written to
a closing stream.
"""

from __future__ import annotations

import asyncio

from gateway.smtpfront import SMALL_FRAME, _FrameWriter


class _Writer:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing


def _frames(writer: _Writer) -> _FrameWriter:
    return _FrameWriter(writer)  # type: ignore[arg-type]  # the two methods it uses


def test_frames_of_one_turn_leave_in_one_write_in_order() -> None:
    async def run() -> list[bytes]:
        writer = _Writer()
        frames = _frames(writer)
        frames.write(b"a")
        frames.write(b"b")
        frames.write(b"c")
        assert writer.writes == []  # nothing before the turn ends
        await asyncio.sleep(0)
        frames.write(b"d")
        await asyncio.sleep(0)
        return writer.writes

    assert asyncio.run(run()) == [b"abc", b"d"]


def test_a_large_frame_goes_at_once_after_what_was_queued() -> None:
    big = b"m" * (SMALL_FRAME + 1)

    async def run() -> list[bytes]:
        writer = _Writer()
        frames = _frames(writer)
        assert frames.write(b"a") is False  # queued: the caller need not wait for it
        assert frames.write(big) is True  # written: the caller waits for room (drain)
        assert frames.write(b"b") is False
        await asyncio.sleep(0)
        return writer.writes

    writes = asyncio.run(run())
    assert writes == [b"a", big, b"b"]


def test_nothing_is_written_to_a_closing_stream() -> None:
    async def run() -> list[bytes]:
        writer = _Writer()
        frames = _frames(writer)
        frames.write(b"a")
        writer.closing = True
        frames.write(b"b")
        await asyncio.sleep(0)
        return writer.writes

    assert asyncio.run(run()) == []
