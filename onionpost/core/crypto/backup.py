"""The encrypted container of ``onionpost backup``.  Pure: streams in, streams out.

A backup holds private keys and plaintext mail, so it is encrypted before it touches the
target file: a key derived from the passphrase with Argon2id (the cost parameters are stored,
so they can grow later) seals the archive with secretstream in 64 KiB chunks.  Truncation is
detected (the last chunk carries the final tag), and so is every altered byte.

Layout: ``"OPbk" ‖ version u8 (1) ‖ salt[16] ‖ opslimit u32 ‖ memlimit u32 ‖ header[24] ‖
chunks`` where each chunk is ``u32 length ‖ secretstream chunk``.
"""

from __future__ import annotations

from onionpost.core.crypto.envelope import Readable, Writable
from onionpost.core.crypto.primitives import (
    RandomSource,
    StreamOpener,
    StreamSealer,
    argon2id,
    system_random,
)
from onionpost.core.errors import MalformedData, WrongPassphrase

MAGIC = b"OPbk"
VERSION = 1
CHUNK = 65536
OPSLIMIT = 3
MEMLIMIT = 64 << 20  # fits a 1 GB Raspberry Pi beside a running node
_AD = MAGIC + bytes([VERSION])


def seal(
    source: Readable, sink: Writable, passphrase: str, *, rng: RandomSource = system_random
) -> int:
    """Encrypt everything ``source`` yields into ``sink``; returns the bytes written."""
    if len(passphrase) < 8:
        raise WrongPassphrase("Choose a passphrase of at least 8 characters for the backup.")
    salt = rng(16)
    key = argon2id(passphrase.encode(), salt, opslimit=OPSLIMIT, memlimit=MEMLIMIT)
    header = rng(24)
    sealer = StreamSealer(key, header)
    head = (
        MAGIC
        + bytes([VERSION])
        + salt
        + OPSLIMIT.to_bytes(4, "big")
        + MEMLIMIT.to_bytes(4, "big")
        + header
    )
    sink.write(head)
    written = len(head)
    chunk = source.read(CHUNK)
    while True:
        following = source.read(CHUNK)
        sealed = sealer.seal(chunk, final=not following)
        sink.write(len(sealed).to_bytes(4, "big") + sealed)
        written += 4 + len(sealed)
        if not following:
            return written
        chunk = following


def open_(source: Readable, sink: Writable, passphrase: str) -> int:
    """Decrypt a backup into ``sink``; returns the plaintext length."""
    head = source.read(53)
    if len(head) != 53 or head[:4] != MAGIC:
        raise MalformedData("This file is not an onionpost backup.")
    if head[4] != VERSION:
        raise MalformedData("This backup was made by a newer onionpost; update onionpost here.")
    salt = head[5:21]
    ops, mem = int.from_bytes(head[21:25], "big"), int.from_bytes(head[25:29], "big")
    if not 1 <= ops <= 16 or not 8 << 20 <= mem <= 1 << 30:
        raise MalformedData("The backup's key parameters are out of range.")
    key = argon2id(passphrase.encode(), salt, opslimit=ops, memlimit=mem)
    opener = StreamOpener(key, head[29:53])
    total = 0
    first = True
    while True:
        size_raw = source.read(4)
        if len(size_raw) != 4:
            raise MalformedData("The backup is truncated.")
        size = int.from_bytes(size_raw, "big")
        if size > CHUNK + 17:
            raise MalformedData("The backup is damaged (a chunk is too long).")
        chunk = source.read(size)
        opened = opener.open(chunk) if len(chunk) == size else None
        if opened is None:
            if first:
                raise WrongPassphrase("The passphrase does not open this backup.")
            raise MalformedData("The backup is damaged or was altered.")
        first = False
        plain, final = opened
        sink.write(plain)
        total += len(plain)
        if final:
            if source.read(1):
                raise MalformedData("The backup has data after its end.")
            return total
