"""Canonical binary encoding: fixed-width big-endian integers and length-prefixed fields.

Every structure has exactly one encoding, so a signature over the encoding is a signature over
the meaning (never sign JSON).  The :class:`Reader` is strict: a short field, an oversized
length, or a trailing byte is :class:`~onionpost.core.errors.MalformedData` naming the structure
and the field, and it never raises anything else, whatever bytes it is given.
"""

from __future__ import annotations

from onionpost.core.errors import MalformedData


class Writer:
    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(1, "big"))
        return self

    def u16(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(2, "big"))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(4, "big"))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(v.to_bytes(8, "big"))
        return self

    def raw(self, b: bytes) -> Writer:
        self._parts.append(bytes(b))
        return self

    def fixed(self, b: bytes, n: int) -> Writer:
        if len(b) != n:
            raise ValueError(f"expected {n} bytes, got {len(b)}")
        self._parts.append(bytes(b))
        return self

    def var8(self, b: bytes) -> Writer:
        return self.u8(len(b)).raw(b)

    def var16(self, b: bytes) -> Writer:
        return self.u16(len(b)).raw(b)

    def var32(self, b: bytes) -> Writer:
        return self.u32(len(b)).raw(b)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads one structure from ``data``; ``what`` names it in error messages."""

    __slots__ = ("_data", "_pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = memoryview(bytes(data)) if not isinstance(data, bytes) else memoryview(data)
        self._pos = 0
        self.what = what

    def _take(self, n: int, field: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise MalformedData(f"The {self.what} is truncated (in its {field}).")
        out = self._data[self._pos : self._pos + n].tobytes()
        self._pos += n
        return out

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    @property
    def position(self) -> int:
        return self._pos

    def consumed(self) -> bytes:
        """Everything read so far (used to sign or hash a structure's prefix)."""
        return self._data[: self._pos].tobytes()

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self._take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self._take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self._take(8, field), "big")

    def fixed(self, n: int, field: str) -> bytes:
        return self._take(n, field)

    def magic(self, expected: bytes) -> None:
        got = self._take(len(expected), "type marker")
        if got != expected:
            raise MalformedData(
                f"This is not a {self.what} (type marker {got!r}, expected {expected!r})."
            )

    def var8(self, field: str, limit: int = 255) -> bytes:
        n = self.u8(field)
        return self._bounded(n, limit, field)

    def var16(self, field: str, limit: int = 0xFFFF) -> bytes:
        n = self.u16(field)
        return self._bounded(n, limit, field)

    def var32(self, field: str, limit: int) -> bytes:
        n = self.u32(field)
        return self._bounded(n, limit, field)

    def _bounded(self, n: int, limit: int, field: str) -> bytes:
        if n > limit:
            raise MalformedData(f"The {self.what}'s {field} is too long ({n} > {limit} bytes).")
        return self._take(n, field)

    def utf8(self, raw: bytes, field: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedData(f"The {self.what}'s {field} is not valid UTF-8.") from exc

    def count(self, field: str, limit: int) -> int:
        n = self.u16(field)
        if n > limit:
            raise MalformedData(f"The {self.what} has too many {field} ({n} > {limit}).")
        return n

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedData(
                f"The {self.what} has {len(self._data) - self._pos} unexpected trailing bytes."
            )
