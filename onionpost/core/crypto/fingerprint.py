"""Human-comparable forms of identity keys.

A *fingerprint* names one identity key; a *safety number* is what two people compare (read
aloud, or side by side) to be sure each has the other's real key.  Both are derived with
BLAKE2b from the keys alone, so every device shows the same digits.
"""

from __future__ import annotations

import base64

from onionpost.core.crypto.primitives import hash32

CTX_FINGERPRINT = b"onionpost/v1/fingerprint\x00"
CTX_SAFETY = b"onionpost/v1/safety-number\x00"


def fingerprint(uik_pk: bytes) -> str:
    """20 base32 characters in groups of four, e.g. ``ab3d-…``."""
    text = base64.b32encode(hash32(CTX_FINGERPRINT, uik_pk)[:15]).decode("ascii").lower()
    return "-".join(text[i : i + 4] for i in range(0, 20, 4))


def safety_number(uik_a: bytes, uik_b: bytes) -> str:
    """Sixty digits in twelve groups of five; the same whichever side computes it."""
    low, high = sorted((uik_a, uik_b))
    digest = hash32(CTX_SAFETY, low, high) + hash32(CTX_SAFETY, high, low)
    groups = []
    for i in range(12):
        chunk = int.from_bytes(digest[i * 5 : i * 5 + 5], "big")
        groups.append(f"{chunk % 100000:05d}")
    return " ".join(groups)
