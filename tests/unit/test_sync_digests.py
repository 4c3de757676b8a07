"""A device takes an opened message's digests from the opening's own pass (in the background
for a large one): the same digests the whole files give, whether the opening succeeds or not,
and a large body's digest is not taken again on the event loop."""

from __future__ import annotations

import hashlib
import io
import tempfile

import pytest

from onionpost.core.normalize import WHOLE_MESSAGE_LIMIT
from onionpost.device import sync
from onionpost.device.sync import _decrypt, _file_digest, _filed_form
from tests.unit.crypto_world import NOW, User, seal_l2, world
from tests.unit.test_sync_stamp import SENDER


def _fetched(l2: bytes) -> tempfile.SpooledTemporaryFile[bytes]:
    """The L2 as the sync loop holds it: in a spooled file, positioned at its end."""
    f = tempfile.SpooledTemporaryFile(max_size=1 << 20)  # noqa: SIM115
    f.write(l2)
    return f


def _prekeys(user: User) -> list[tuple[int, bytes, bytes]]:
    return [(p.spk_id, p.secret, p.public) for p in user.devices[0].prekeys]


def _digest16(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


@pytest.mark.parametrize("size", [100, 600 * 1024, WHOLE_MESSAGE_LIMIT + 100_000])
def test_the_digests_are_those_of_the_whole_files(size: int) -> None:
    rng, alice, bob, _ = world(b"digests")
    message = b"Subject: big\r\n\r\n" + bytes(i % 7 + 65 for i in range(size))
    l2, _ = seal_l2(alice, [bob], message, rng)
    with _fetched(l2) as f:
        opened = _decrypt(f, _prekeys(bob), bob.uik_pk, NOW)
        with opened.body:
            assert opened.error is None
            assert opened.digest == _digest16(l2)
            opened.body.seek(0)
            assert opened.body.read() == message
            if size > WHOLE_MESSAGE_LIMIT:
                assert opened.body_digest == _file_digest(io.BytesIO(message))
                # the Message-ID a large message without one gets is the same either way
                assert _filed_form(opened.body, SENDER, NOW, opened.body_digest) == _filed_form(
                    opened.body, SENDER, NOW
                )
            else:
                assert opened.body_digest is None


@pytest.mark.parametrize("size", [100, WHOLE_MESSAGE_LIMIT + 100_000])
def test_a_message_that_fails_to_open_is_named_by_its_whole_l2(size: int) -> None:
    rng, alice, bob, _ = world(b"digest-bad")
    l2, _ = seal_l2(alice, [bob], b"x" * size, rng)
    bad = bytearray(l2)
    bad[len(bad) // 2] ^= 1  # the opening stops there; the digest still covers all of it
    with _fetched(bytes(bad)) as f:
        opened = _decrypt(f, _prekeys(bob), bob.uik_pk, NOW)
        with opened.body:
            assert opened.error is not None
            assert opened.digest == _digest16(bytes(bad))


def test_a_large_body_is_not_hashed_again_when_filed(monkeypatch: pytest.MonkeyPatch) -> None:
    rng, alice, bob, _ = world(b"digest-once")
    message = b"Subject: big\r\n\r\n" + b"y" * (WHOLE_MESSAGE_LIMIT + 1)
    l2, _ = seal_l2(alice, [bob], message, rng)
    with _fetched(l2) as f:
        opened = _decrypt(f, _prekeys(bob), bob.uik_pk, NOW)

    def no_second_pass(f: object) -> bytes:
        raise AssertionError("the body was hashed again")

    monkeypatch.setattr(sync, "_file_digest", no_second_pass)
    with opened.body:
        head, offset = _filed_form(opened.body, SENDER, NOW, opened.body_digest)
        assert offset is not None and b"Message-ID: <" in head
