"""The gateway's DATA reader takes exactly the message a line-by-line reader would.

``_Connection._spool_data`` reads in runs up to the next line-start dot instead of one
``readuntil`` per line (most of the SMTP front's DATA cost).  Here it is checked against a
plain line-by-line reading of RFC 5321 §4.5.2 (a line is up to CRLF; the line ``.`` ends the
data; a leading dot is removed) on chosen streams and on seeded random ones, fed in pieces of
every size and with small reader limits, so that the dots, CRs and LFs fall on every
boundary: the same message, the same verdict (complete, too large, or EOF), and nothing of
what follows the final dot taken from the reader.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random

import pytest

from gateway.smtp import _EOF, _TOO_LARGE, _Connection

Outcome = tuple[object, bytes, bytes]  # (verdict, message, what is left in the reader)


def line_by_line(stream: bytes, max_bytes: int) -> Outcome:
    out, at, size = bytearray(), 0, 0
    while True:
        end = stream.find(b"\r\n", at)
        if end < 0:
            return _EOF, b"", b""
        line, at = stream[at : end + 2], end + 2
        if line == b".\r\n":
            break
        if line.startswith(b"."):
            line = line[1:]
        size += len(line)
        if size <= max_bytes:
            out += line
    verdict = _TOO_LARGE if size > max_bytes else None
    return verdict, b"" if verdict else bytes(out), stream[at:]


class _Reader:
    """Just what ``_spool_data`` uses of the connection."""

    _spool_data = _Connection._spool_data
    _data_piece = _Connection._data_piece

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int) -> None:
        self._reader = reader
        self._max_bytes = max_bytes

    def _reset_timeout(self) -> None:
        pass


def spooled(stream: bytes, max_bytes: int, limit: int, cuts: list[int]) -> Outcome:
    async def run() -> Outcome:
        reader = asyncio.StreamReader(limit=limit)
        bounds = [0, *cuts, len(stream)]

        async def feed() -> None:
            for start, end in itertools.pairwise(bounds):
                reader.feed_data(stream[start:end])
                await asyncio.sleep(0)
            reader.feed_eof()

        feeding = asyncio.create_task(feed())
        body = io.BytesIO()
        verdict = await _Reader(reader, max_bytes)._spool_data(body)
        await feeding
        left = await reader.read()
        if verdict is _EOF:
            return _EOF, b"", b""
        return verdict, b"" if verdict else body.getvalue(), left

    return asyncio.run(run())


CHOSEN = [
    b".\r\n",
    b"..\r\n.\r\n",
    b"a\r\n.\r\n",
    b"\r\n.\r\n",
    b"\r\n\r\n.\r\n",
    b".a\r\n.b\r\n..\r\n.\r\nNEXT\r\n",
    b"a\n.\r\n.\r\n",  # a bare LF before a dot is not a line's start
    b"a\r.\r\n.\r\n",
    b"a\r\n.\r\r\n.\r\n",
    b"x" * 3000 + b"\r\n." + b"y" * 3000 + b"\r\n.\r\nQUIT\r\n",
    b"no end\r\n",
    b"no end\r\n.",
    b"",
]


@pytest.mark.parametrize("stream", CHOSEN)
@pytest.mark.parametrize("limit", [2, 3, 16, 1001])
def test_chosen_streams_in_every_split(stream: bytes, limit: int) -> None:
    for cut in range(len(stream) + 1) if len(stream) < 64 else (0, 1, 2999, 3001, 3002):
        for max_bytes in (3, 10**6):
            expected = line_by_line(stream, max_bytes)
            assert spooled(stream, max_bytes, limit, [cut]) == expected, (stream, cut)


def test_random_streams() -> None:
    rng = random.Random(20261203)
    parts = [b".", b"\r", b"\n", b"\r\n", b"a", b"..", b"\r\n.", b"\r\n.\r\n", b"x" * 1500]
    for _ in range(1500):
        stream = b"".join(rng.choice(parts) for _ in range(rng.randint(0, 30)))
        if rng.random() < 0.7:
            stream += b"\r\n.\r\nMAIL FROM:<a@b>\r\n"
        max_bytes = rng.choice([10, 100, 5000, 10**9])
        limit = rng.choice([4, 16, 1001])
        cuts = sorted(rng.sample(range(len(stream) + 1), min(len(stream) + 1, rng.randint(0, 5))))
        assert spooled(stream, max_bytes, limit, cuts) == line_by_line(stream, max_bytes), stream
