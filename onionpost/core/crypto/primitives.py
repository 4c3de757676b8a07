"""The only module that calls libsodium (through PyNaCl).

Everything above speaks in bytes and these few verbs, so the construction can be read (and
reviewed) without knowing PyNaCl, and every libsodium failure leaves here as an
:class:`~onionpost.core.errors.OnionpostError`.

Randomness is a parameter everywhere (:data:`RandomSource`); :class:`SeededRandom` makes
every structure reproducible from a seed, which is how ``docs/protocol.md``'s test vectors
are generated and checked.

One libsodium detail matters for that: ``crypto_secretstream_xchacha20poly1305_init_push``
draws its 24-byte header from the system RNG.  ``init_pull`` derives exactly the same state
from a given header, so we initialise the *push* state with ``init_pull`` on a header we drew
from the injected RNG.  The ciphertext is the standard secretstream format either way.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Protocol

import nacl.bindings as sodium
import nacl.exceptions
import nacl.pwhash
import nacl.utils

from onionpost.core.errors import BadSignature, CryptoError, MalformedData

#: ``rng(n)`` returns the next ``n`` bytes of a random stream.  Callers may draw several
#: fields at once and slice them (``rng(a + b)`` stands for ``rng(a)`` then ``rng(b)``), so a
#: source must be a byte stream, as :class:`SeededRandom` and the system RNG are.
RandomSource = Callable[[int], bytes]

KEY_BYTES = 32
SIGNATURE_BYTES = 64
AEAD_NONCE_BYTES = 24
AEAD_TAG_BYTES = 16
STREAM_HEADER_BYTES = 24
STREAM_ABYTES = 17  # one tag byte + 16-byte MAC per chunk
TAG_MESSAGE = 0
TAG_FINAL = 3


def system_random(n: int) -> bytes:
    """libsodium's ``randombytes_buf``: the production randomness."""
    return nacl.utils.random(n)


class SeededRandom:
    """A deterministic byte stream (BLAKE2b in counter mode), for test vectors and tests only."""

    def __init__(self, seed: bytes) -> None:
        self._seed = hashlib.blake2b(seed, digest_size=32, person=b"onionpost-rng").digest()
        self._counter = 0
        self._buffer = b""

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            block = hashlib.blake2b(
                self._counter.to_bytes(8, "big"), key=self._seed, digest_size=64
            ).digest()
            self._buffer += block
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out


# --- hashing and key derivation --------------------------------------------------------------


def hash32(*parts: bytes | memoryview) -> bytes:
    """BLAKE2b-256 over the concatenation of ``parts``."""
    h = hashlib.blake2b(digest_size=32)
    for part in parts:
        h.update(part)
    return h.digest()


class Hasher(Protocol):
    """An incremental BLAKE2b-256: what :func:`hasher` returns."""

    def update(self, data: bytes, /) -> None: ...

    def digest(self) -> bytes: ...


#: From this many bytes on, libsodium's BLAKE2b (vectorised) beats hashlib's reference code
#: despite PyNaCl's per-call overhead (~25 % faster per MiB on the bench machine).
SODIUM_HASH_MIN = 64 * 1024


class _SodiumHasher:
    """BLAKE2b-256 through libsodium's ``crypto_generichash``: the same digest as hashlib's."""

    __slots__ = ("_digest", "_state")

    def __init__(self) -> None:
        self._state = sodium.crypto_generichash_blake2b_init(digest_size=32)
        self._digest: bytes | None = None

    def update(self, data: bytes, /) -> None:
        if self._digest is not None:
            raise CryptoError("A finished hash cannot be updated.")
        sodium.crypto_generichash_blake2b_update(self._state, data)

    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = sodium.crypto_generichash_blake2b_final(self._state)
        return self._digest


def hasher(expected_len: int) -> Hasher:
    """An incremental BLAKE2b-256 for about ``expected_len`` bytes fed as ``bytes`` objects
    (libsodium's for long inputs, hashlib's for short ones: the digest is the same)."""
    if expected_len >= SODIUM_HASH_MIN:
        return _SodiumHasher()
    return hashlib.blake2b(digest_size=32)


def kdf(key: bytes, label: bytes, salt: bytes = b"") -> bytes:
    """A 32-byte subkey: BLAKE2b-256(key=key, data = u16(len(label)) || label || salt).

    ``label`` is one of the context strings of docs/protocol.md ("onionpost/v1/..."); the
    length prefix keeps (label, salt) pairs from colliding.
    """
    if not 1 <= len(key) <= 64:
        raise CryptoError("A key-derivation key must be 1 to 64 bytes long.")
    h = hashlib.blake2b(key=key, digest_size=32)
    h.update(len(label).to_bytes(2, "big"))
    h.update(label)
    h.update(salt)
    return h.digest()


def mac32(key: bytes, data: bytes) -> bytes:
    """BLAKE2b-256 keyed MAC."""
    return hashlib.blake2b(data, key=key, digest_size=32).digest()


def constant_time_equal(a: bytes, b: bytes) -> bool:
    """Compare without a timing side channel (``hmac.compare_digest``: no FFI round trip)."""
    return hmac.compare_digest(a, b)


# --- Ed25519 ---------------------------------------------------------------------------------


def ed25519_public(seed: bytes) -> bytes:
    return ed25519_keypair(seed)[0]


def ed25519_keypair(seed: bytes) -> tuple[bytes, bytes]:
    """``(public key, expanded secret key)`` from a 32-byte seed, in one base-point
    multiplication; sign with :func:`ed25519_sign_expanded` to avoid deriving it again."""
    if len(seed) != KEY_BYTES:
        raise CryptoError("An Ed25519 seed must be 32 bytes.")
    public, secret = sodium.crypto_sign_seed_keypair(seed)
    return public, secret


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    return ed25519_sign_expanded(ed25519_keypair(seed)[1], message)


def ed25519_sign_expanded(secret: bytes, message: bytes) -> bytes:
    """A detached signature with an expanded secret key from :func:`ed25519_keypair`."""
    signed: bytes = sodium.crypto_sign(message, secret)
    return signed[:SIGNATURE_BYTES]


def ed25519_verify(public: bytes, message: bytes, signature: bytes, what: str) -> None:
    """Raise :class:`BadSignature` naming ``what`` unless ``signature`` is valid."""
    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        raise BadSignature(f"The signature on the {what} is malformed.")
    try:
        sodium.crypto_sign_open(signature + message, public)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError) as exc:
        raise BadSignature(f"The signature on the {what} does not verify.") from exc


#: Points already found valid (a pure property of the 32 bytes), so that the few keys every
#: message carries (the sender's identity, device and server keys, parsed again from each
#: message's credentials and each contact record) are checked once, not per message.  Only
#: valid points are remembered; bounded, and cleared when full.
_VALID_POINTS: set[bytes] = set()
_VALID_POINTS_MAX = 4096


def ed25519_is_valid_point(public: bytes) -> bool:
    """True for a canonical point of the prime-order subgroup (no torsion component)."""
    if len(public) != KEY_BYTES:
        return False
    key = bytes(public)
    if key in _VALID_POINTS:
        return True
    if not sodium.crypto_core_ed25519_is_valid_point(key):
        return False
    if len(_VALID_POINTS) >= _VALID_POINTS_MAX:
        _VALID_POINTS.clear()
    _VALID_POINTS.add(key)
    return True


# --- X25519 ----------------------------------------------------------------------------------


def x25519_public(secret: bytes) -> bytes:
    return sodium.crypto_scalarmult_base(secret)


def x25519(secret: bytes, public: bytes) -> bytes:
    """Diffie-Hellman; an all-zero result (a low-order public key) is refused, as age requires."""
    if len(public) != KEY_BYTES or len(secret) != KEY_BYTES:
        raise MalformedData("An X25519 key has the wrong length.")
    try:
        shared = sodium.crypto_scalarmult(secret, public)
    except (RuntimeError, nacl.exceptions.RuntimeError) as exc:
        raise CryptoError("A public key is of low order and cannot be used.") from exc
    if shared == bytes(KEY_BYTES):
        raise CryptoError("A public key is of low order and cannot be used.")
    return shared


# --- passphrases ---------------------------------------------------------------------------------


def argon2id(passphrase: bytes, salt: bytes, *, opslimit: int, memlimit: int) -> bytes:
    """A 32-byte key from a passphrase (libsodium's Argon2id); slow on purpose."""
    if len(salt) != nacl.pwhash.argon2id.SALTBYTES:
        raise MalformedData("An Argon2id salt must be 16 bytes.")
    try:
        key: bytes = nacl.pwhash.argon2id.kdf(
            32, passphrase, salt, opslimit=opslimit, memlimit=memlimit
        )
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
        raise MalformedData(f"Argon2id parameters out of range: {exc}") from exc
    return key


# --- AEAD: XChaCha20-Poly1305-IETF -----------------------------------------------------------


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes | None:
    """The plaintext, or ``None`` if the ciphertext or AAD was altered (callers name the error)."""
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError):
        return None


# --- secretstream (chunked XChaCha20-Poly1305) ------------------------------------------------


class StreamSealer:
    """Encrypts one stream, chunk by chunk; the last chunk carries TAG_FINAL."""

    def __init__(self, key: bytes, header: bytes) -> None:
        if len(header) != STREAM_HEADER_BYTES:
            raise CryptoError("A secretstream header must be 24 bytes.")
        self.header = header
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)

    def seal(self, chunk: bytes, *, final: bool) -> bytes:
        tag = TAG_FINAL if final else TAG_MESSAGE
        return sodium.crypto_secretstream_xchacha20poly1305_push(self._state, chunk, None, tag)


class StreamOpener:
    """Decrypts one stream; reports each chunk's authenticity and whether it was the final one."""

    def __init__(self, key: bytes, header: bytes) -> None:
        if len(header) != STREAM_HEADER_BYTES:
            raise MalformedData("A secretstream header must be 24 bytes.")
        self._state = sodium.crypto_secretstream_xchacha20poly1305_state()
        try:
            sodium.crypto_secretstream_xchacha20poly1305_init_pull(self._state, header, key)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError) as exc:
            raise MalformedData("A secretstream header is invalid.") from exc

    def open(self, chunk: bytes) -> tuple[bytes, bool] | None:
        """``(plaintext, is_final)``, or ``None`` when the chunk does not authenticate."""
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(self._state, chunk, None)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, ValueError):
            return None
        if tag not in (TAG_MESSAGE, TAG_FINAL):
            return None
        return plain, tag == TAG_FINAL
