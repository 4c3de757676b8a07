"""Envelope size buckets: a 16 KiB floor, then Padmé.

Padmé (Nikitin et al., PoPETs 2019) rounds a length L up so that only O(log log L) bits of it
survive, costing at most 12 % (about 6 % at 1 MB).  The 16 KiB floor (as in Pond) makes every
short mail the same size on the wire.
"""

from __future__ import annotations

FLOOR = 16 * 1024


def padme(length: int) -> int:
    """The Padmé bucket of ``length`` (itself a valid bucket size)."""
    if length <= 2:
        return length
    e = length.bit_length() - 1  # floor(log2 L)
    s = e.bit_length()  # floor(log2 e) + 1
    last_bits = e - s
    mask = (1 << last_bits) - 1
    return (length + mask) & ~mask


def bucket(length: int) -> int:
    """The padded size for an envelope whose content needs ``length`` bytes."""
    return max(FLOOR, padme(length))
