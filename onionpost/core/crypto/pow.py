"""Proof-of-work stamps: what a stranger pays to put mail in someone's inbox.

Contacts present a delivery token instead and pay nothing.  A stamp is a nonce such that

    BLAKE2b-256("onionpost/v1/pow\\0" || mailbox_id || u32 day || message_hash
                || u8 bits || u64 nonce)

starts with at least ``bits`` zero bits.  It is bound to the recipient mailbox, the UTC day
(so stamps cannot be stockpiled: the inbox accepts yesterday, today and tomorrow) and the
hash of the sealed message (so one stamp buys one message).  Verifying is one hash; minting
takes 2**bits hashes on average.  Tor's own onion-service PoW (Equi-X) separately protects
reachability; this stamp protects the mailbox.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from onionpost.core.errors import ProofOfWorkError

CTX_POW = b"onionpost/v1/pow\x00"
DAY = 86_400
MAX_BITS = 40


@dataclass(frozen=True)
class Stamp:
    bits: int
    day: int
    nonce: int


def day_of(now: int) -> int:
    return now // DAY


def _prefix(mailbox_id: bytes, day: int, message_hash: bytes, bits: int) -> hashlib.blake2b:
    h = hashlib.blake2b(digest_size=32)
    h.update(CTX_POW + mailbox_id + day.to_bytes(4, "big") + message_hash + bytes([bits]))
    return h


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def mint(mailbox_id: bytes, message_hash: bytes, bits: int, now: int, start: int = 0) -> Stamp:
    """Search for a stamp; expected cost 2**bits hashes (see `make bench` for the rate)."""
    while True:
        stamp = mint_some(mailbox_id, message_hash, bits, now, start=start, count=1 << 20)
        if stamp is not None:
            return stamp
        start += 1 << 20


def mint_some(
    mailbox_id: bytes, message_hash: bytes, bits: int, now: int, *, start: int, count: int
) -> Stamp | None:
    """Try the nonces ``start .. start+count-1`` in order; the first that pays, or None.

    Searching in slices lets a caller stop between them (a worker thread cannot be
    cancelled, and a node that is told to stop should not first finish a long search);
    slice after slice finds exactly the stamp :func:`mint` finds.
    """
    if not 0 <= bits <= MAX_BITS:
        raise ProofOfWorkError(f"A difficulty of {bits} bits is out of range (0..{MAX_BITS}).")
    day = day_of(now)
    base = _prefix(mailbox_id, day, message_hash, bits)
    threshold = 1 << (256 - bits)
    for nonce in range(start, start + count):
        h = base.copy()
        h.update(nonce.to_bytes(8, "big"))
        if int.from_bytes(h.digest(), "big") < threshold:
            return Stamp(bits, day, nonce)
    return None


def verify(
    stamp: Stamp, mailbox_id: bytes, message_hash: bytes, required_bits: int, now: int
) -> None:
    """Raise :class:`ProofOfWorkError` unless ``stamp`` pays for this message today."""
    if stamp.bits < required_bits:
        raise ProofOfWorkError(
            f"The proof of work has difficulty {stamp.bits}; this inbox requires {required_bits}."
        )
    if stamp.bits > MAX_BITS:
        raise ProofOfWorkError("The proof of work's difficulty is out of range.")
    if abs(stamp.day - day_of(now)) > 1:
        raise ProofOfWorkError("The proof of work was made for another day.")
    if not 0 <= stamp.nonce < 1 << 64:
        raise ProofOfWorkError("The proof of work's nonce is out of range.")
    h = _prefix(mailbox_id, stamp.day, message_hash, stamp.bits)
    h.update(stamp.nonce.to_bytes(8, "big"))
    if leading_zero_bits(h.digest()) < stamp.bits:
        raise ProofOfWorkError()
