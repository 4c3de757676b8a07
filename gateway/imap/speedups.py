"""pymap's BytesFormat without typing-Protocol isinstance checks on the hot path (scratch)."""

from __future__ import annotations

from typing import Any

from pymap.bytes import BytesFormat

_original_mod = BytesFormat.__mod__


def _mod(self: BytesFormat, other: Any) -> bytes:  # noqa: ANN401
    # A plain tuple or list has neither __index__ nor __bytes__: pymap's own checks
    # (isinstance against SupportsIndex and SupportsBytes, slow on Python 3.11) would
    # both be False and it would call format(other); do that directly.
    if type(other) is tuple or type(other) is list:
        return self.format(other)
    return _original_mod(self, other)


def install() -> None:
    if BytesFormat.__mod__ is not _mod:
        BytesFormat.__mod__ = _mod  # type: ignore[method-assign]
