"""Hashing beside the cipher: a large message's hash passes run in a thread of their own.

Sealing a message hashes its body and its L2 ciphertext, and opening one hashes them again;
each BLAKE2b pass over a large message costs about as much as the cipher's pass (on the bench
machine ~1 GB/s against ~1.3 GB/s).  Done in line, one after the other, they made a 1 MiB seal
take almost six times one AEAD pass.  Both hashlib and libsodium let go of the GIL while they
hash a large buffer, so a second thread can hash one piece while the caller encrypts or
decrypts the next: the hash passes run beside the cipher instead of after it.  How much that
saves depends on the cores: the bench VM's two vCPUs run two hashing threads only 1.4-1.8x
as fast as one, and there a 1 MiB open took a third less time, a seal a tenth less.

The crypto code stays free of threads (``onionpost.core`` may not import ``threading``): its
functions take a ``hashers`` factory, whose default hashes in line, and the callers that seal
or open large messages pass :func:`hasher_in_background`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import threading
from collections.abc import Callable
from typing import Protocol

from onionpost.core.crypto.primitives import Hasher, hasher

#: From this many bytes on a hash runs in the background.  Below, the hand-overs to a thread
#: (tens of microseconds each) ate what it saved on the bench machine: at 256 KiB a seal or
#: an open was as quick either way, at 512 KiB 7-25 % quicker in the background.
BACKGROUND_MIN = 512 * 1024

#: Pieces a hash may have queued before :meth:`BackgroundHasher.update` waits: it bounds the
#: memory a slow hashing thread can hold (8 of the envelope's 64 KiB chunks) and keeps the
#: caller from running far ahead of it.
MAX_QUEUED = 8


class Digest(Protocol):
    """A running hash: hashlib's objects, or :class:`~onionpost.core.crypto.primitives.Hasher`."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


class _Pool:
    executor: concurrent.futures.ThreadPoolExecutor | None = None
    lock = threading.Lock()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The process's hashing threads, one per CPU.  Separate from the crypto pool on purpose:
    a sealing worker there waits for its hash, so the hash must not queue behind it."""
    with _Pool.lock:
        if _Pool.executor is None:
            _Pool.executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="hash"
            )
        return _Pool.executor


class BackgroundHasher:
    """A hash whose :meth:`update` hands the piece to a hashing thread and returns.

    The pieces are hashed in the order given, by one thread at a time, so the digest is the
    one ``inner`` would give in line.  A piece must not change until :meth:`digest` returns
    (the envelope's pieces are ``bytes``, or views of a body the caller holds still).
    :meth:`digest` waits for the queued pieces; an error raised while hashing is raised again
    by the next :meth:`update` or :meth:`digest`.
    """

    def __init__(self, inner: Digest) -> None:
        self._inner = inner
        self._pieces: collections.deque[bytes] = collections.deque()
        self._cond = threading.Condition()
        self._draining = False
        self._error: BaseException | None = None

    def update(self, data: bytes, /) -> None:
        with self._cond:
            while len(self._pieces) >= MAX_QUEUED and self._error is None:
                self._cond.wait()
            self._raise_error()
            self._pieces.append(data)
            if not self._draining:
                self._draining = True
                try:
                    _pool().submit(self._drain)
                except RuntimeError:  # no new threads while the interpreter shuts down
                    self._draining = False
                    while self._pieces:
                        self._inner.update(self._pieces.popleft())

    def digest(self) -> bytes:
        with self._cond:
            while self._draining:
                self._cond.wait()
            self._raise_error()
        return self._inner.digest()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """Hash the queued pieces until none is left (runs in the hashing pool)."""
        while True:
            with self._cond:
                if not self._pieces:
                    self._draining = False
                    self._cond.notify_all()
                    return
                piece = self._pieces.popleft()
                self._cond.notify_all()  # room for a waiting update
            try:
                self._inner.update(piece)
            except BaseException as exc:
                with self._cond:
                    self._error = exc
                    self._pieces.clear()
                    self._draining = False
                    self._cond.notify_all()
                return


def hasher_in_background(expected_len: int) -> Hasher:
    """The envelope's BLAKE2b-256 for about ``expected_len`` bytes: hashed in the background
    from :data:`BACKGROUND_MIN` bytes on, in line below (the same digest either way)."""
    inner = hasher(expected_len)
    return BackgroundHasher(inner) if expected_len >= BACKGROUND_MIN else inner


def digest_in_background(make: Callable[[], Digest], expected_len: int) -> Digest:
    """Any hash (``make()`` starts one) for about ``expected_len`` bytes, in the background
    from :data:`BACKGROUND_MIN` bytes on."""
    inner = make()
    return BackgroundHasher(inner) if expected_len >= BACKGROUND_MIN else inner
