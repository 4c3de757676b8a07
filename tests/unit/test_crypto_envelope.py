"""Round trips through all three layers, and the checks on who may read a message and when.

Each case seals L3 -> L2 -> L1 exactly as a sending device does, unwraps L1 as the
recipient's inbox does, and opens L2 on *every* device that should be able to, including the
sender's own other devices.
"""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onionpost.core.crypto import envelope as env
from onionpost.core.crypto.primitives import SeededRandom, hash32
from onionpost.core.errors import (
    CryptoError,
    ForwardedMessage,
    InvalidLifetime,
    MalformedData,
    MessageExpired,
    MessageFromFuture,
    MessageTooLarge,
    MessageTruncated,
    NoStanzaForDevice,
    NotARecipient,
    NotForThisInbox,
    ReplayedMessage,
)
from tests.unit.crypto_world import (
    DAY,
    NOW,
    AlwaysSeen,
    SeenSet,
    User,
    build_l1,
    forged_message,
    make_user,
    open_l1,
    open_l2,
    recover_l3,
    seal_l1,
    seal_l2,
    world,
    wrap_l3,
)

KiB = 1024
MiB = 1024 * KiB


def _body(n: int, seed: int = 7) -> bytes:
    """Incompressible-looking but cheap bytes (a repeating 4 KiB random block would let a
    chunk-swap go unnoticed, so every chunk differs via the counter prefix)."""
    rng = SeededRandom(seed.to_bytes(4, "big"))
    block = rng(4096)
    out = bytearray()
    i = 0
    while len(out) < n:
        out += i.to_bytes(8, "big") + block[8:]
        i += 1
    return bytes(out[:n])


def _deliver_and_open_everywhere(sender: User, recipients: list[User], body: bytes) -> None:
    rng = SeededRandom(b"deliver" + len(body).to_bytes(8, "big"))
    l2, sealed = seal_l2(sender, recipients, body, rng)
    assert sealed.length == len(l2)
    assert sealed.digest == hash32(l2)
    readers = [*recipients, sender] if len(sender.devices) > 1 else list(recipients)
    for reader in readers:
        if reader is sender:
            l2_seen = l2  # the sender's own copies go through the sender's own inbox
            devices = range(1, len(sender.devices))
        else:
            l1 = seal_l1(l2, reader, rng)
            assert len(l1) == env.outer_length(len(l2))
            meta, l2_seen = open_l1(l1, reader)
            assert l2_seen == l2
            assert meta.l2_digest == sealed.digest
            assert meta.mailbox_id == reader.mailbox_id
            devices = range(len(reader.devices))
        for i in devices:
            msg, got = open_l2(l2_seen, reader, i)
            assert got == body
            assert msg.msg_id == sealed.msg_id
            assert msg.body_hash == hash32(body)
            h = msg.header
            assert h.sender_uik == sender.uik_pk
            assert h.sender_local == sender.local
            assert h.sender_onion_pk == sender.onion_pk
            assert h.sender_device_id == sender.devices[0].device_id
            assert h.sender_dsk_pk == sender.devices[0].dsk_pk
            assert reader.uik_pk in h.recipients
            assert h.expires_at == sealed.expires_at


@pytest.mark.parametrize("n_devices", range(1, 9))
def test_round_trip_each_device_count(n_devices: int) -> None:
    rng = SeededRandom(b"devices%d" % n_devices)
    alice = make_user("alice", 2, rng)
    bob = make_user("bob", n_devices, rng)
    _deliver_and_open_everywhere(alice, [bob], b"Subject: hi\r\n\r\nhello bob\r\n")


@pytest.mark.parametrize(
    "size",
    [0, 1, 64 * KiB - 1, 64 * KiB, 64 * KiB + 1, 2 * 64 * KiB, 3 * MiB + 5],
    ids=["0B", "1B", "64KiB-1", "64KiB", "64KiB+1", "128KiB", "3MiB+5"],
)
def test_round_trip_body_sizes(size: int) -> None:
    _, alice, bob, carol = world(b"sizes")
    _deliver_and_open_everywhere(alice, [bob, carol], _body(size))


def test_round_trip_50_mib() -> None:
    """The largest message the default inbox accepts, through every layer, once."""
    rng, alice, bob, _ = world(b"50MiB")
    body = _body(50 * MiB)
    l2, sealed = seal_l2(alice, [bob], body, rng, include_own_devices=False)
    l1 = seal_l1(l2, bob, rng)
    assert len(l1) == env.outer_length(len(l2))
    del l2
    _, l2_back = open_l1(l1, bob)
    del l1
    msg, got = open_l2(l2_back, bob, 2)
    assert msg.msg_id == sealed.msg_id
    assert got == body


def test_several_recipients_and_own_devices() -> None:
    _, alice, bob, carol = world(b"group")
    _deliver_and_open_everywhere(alice, [bob, carol], b"to both")


def test_retired_prekey_still_opens_late_mail() -> None:
    rng, alice, bob, _ = world(b"late")
    l2, _ = seal_l2(alice, [bob], b"late mail", rng)
    for dev in bob.devices:
        dev.new_prekey(NOW + DAY, 7 * DAY, rng=rng)
    _, body = open_l2(l2, bob, 0, now=NOW + DAY)
    assert body == b"late mail"
    bob.devices[0].drop_retired_prekeys(NOW + 90 * DAY, 60 * DAY)
    with pytest.raises(NoStanzaForDevice):
        open_l2(l2, bob, 0, now=NOW + DAY)


def test_stanza_count_is_padded_to_a_multiple_of_four() -> None:
    rng = SeededRandom(b"pad4")
    alice = make_user("alice", 1, rng)
    for n in range(1, 10):
        bob = make_user("bob", n, rng)
        l2, _ = seal_l2(alice, [bob], b"x", rng)
        count = int.from_bytes(l2[5:7], "big")
        assert count % 4 == 0
        assert n <= count < n + 4


@settings(max_examples=25, deadline=None)
@given(
    body=st.binary(max_size=200 * KiB),
    n_devices=st.integers(1, 8),
    seed=st.binary(min_size=1, max_size=8),
    data=st.data(),
)
def test_round_trip_property(body: bytes, n_devices: int, seed: bytes, data: st.DataObject) -> None:
    rng = SeededRandom(seed)
    alice = make_user("alice", 1, rng)
    bob = make_user("bob", n_devices, rng)
    l2, sealed = seal_l2(alice, [bob], body, rng)
    l1 = seal_l1(l2, bob, rng)
    _, l2_back = open_l1(l1, bob)
    device = data.draw(st.integers(0, n_devices - 1))
    msg, got = open_l2(l2_back, bob, device)
    assert got == body
    assert msg.msg_id == sealed.msg_id


def test_sealing_is_deterministic_under_a_seed() -> None:
    def once() -> tuple[bytes, bytes]:
        rng, alice, bob, _ = world(b"det")
        l2, _ = seal_l2(alice, [bob], b"same", rng)
        return l2, seal_l1(l2, bob, rng)

    assert once() == once()


# --- who may read it ---------------------------------------------------------------------------


def test_wrong_device_has_no_stanza() -> None:
    rng, alice, bob, carol = world(b"wrongdev")
    l2, _ = seal_l2(alice, [bob], b"for bob", rng)
    with pytest.raises(NoStanzaForDevice):
        open_l2(l2, carol, 0)


def test_device_added_after_sending_has_no_stanza() -> None:
    rng, alice, bob, _ = world(b"newdev")
    l2, _ = seal_l2(alice, [bob], b"before", rng)
    from onionpost.core.crypto.keys import DeviceSecrets

    bob.devices.append(DeviceSecrets.generate("new", NOW, rng=rng))
    with pytest.raises(NoStanzaForDevice):
        open_l2(l2, bob, len(bob.devices) - 1)


def test_wrong_inbox_cannot_unwrap_l1() -> None:
    rng, alice, bob, carol = world(b"wronginbox")
    l2, _ = seal_l2(alice, [bob], b"x", rng)
    l1 = seal_l1(l2, bob, rng)
    with pytest.raises(NotForThisInbox):
        open_l1(l1, carol)  # carol's inbox has other key ids
    carol.server.server_keys[0] = type(carol.server.server_keys[0])(
        bob.binding.sek_id, carol.server.server_keys[0].secret, NOW
    )
    with pytest.raises(NotForThisInbox):
        open_l1(l1, carol)  # same key id, different key


def test_retired_server_key_opens_until_dropped() -> None:
    rng, alice, bob, _ = world(b"sek")
    l2, _ = seal_l2(alice, [bob], b"x", rng)
    l1 = seal_l1(l2, bob, rng)
    bob.server.new_server_key(NOW + DAY, rng=rng)
    assert open_l1(l1, bob)[1] == l2
    bob.server.drop_retired(NOW + 60 * DAY, 30 * DAY)
    with pytest.raises(NotForThisInbox):
        open_l1(l1, bob)


# --- when ------------------------------------------------------------------------------------


def test_lifetime_window() -> None:
    rng, alice, bob, _ = world(b"lifetime")
    l2, sealed = seal_l2(alice, [bob], b"x", rng, lifetime=DAY)
    open_l2(l2, bob, 0, now=sealed.expires_at)  # the last second is still fine
    with pytest.raises(MessageExpired):
        open_l2(l2, bob, 0, now=sealed.expires_at + 1)
    open_l2(l2, bob, 0, now=NOW - env.CLOCK_SKEW)  # sender's clock 10 min ahead: fine
    with pytest.raises(MessageFromFuture):
        open_l2(l2, bob, 0, now=NOW - env.CLOCK_SKEW - 1)


def test_l1_expiry_is_enforced_by_the_inbox() -> None:
    rng, alice, bob, _ = world(b"l1exp")
    l2, _ = seal_l2(alice, [bob], b"x", rng)
    l1 = seal_l1(l2, bob, rng)  # not_after = NOW + 7 days
    open_l1(l1, bob, now=NOW + 7 * DAY)
    with pytest.raises(MessageExpired):
        open_l1(l1, bob, now=NOW + 7 * DAY + 1)


def test_sealing_refuses_bad_lifetimes_and_recipients() -> None:
    rng, alice, bob, _ = world(b"refuse")
    with pytest.raises(CryptoError):
        seal_l2(alice, [bob], b"x", rng, lifetime=30 * DAY + 1)
    with pytest.raises(CryptoError):
        seal_l2(alice, [bob], b"x", rng, lifetime=-1)
    with pytest.raises(CryptoError):
        env.seal_inner(
            sender=alice.sender(),
            targets=bob.targets(),
            recipient_uiks=[],
            body=b"x",
            created_at=NOW,
            expires_at=NOW,
            sink=io.BytesIO(),
            rng=rng,
        )
    with pytest.raises(CryptoError):
        env.seal_inner(
            sender=alice.sender(),
            targets=[],
            recipient_uiks=[bob.uik_pk],
            body=b"x",
            created_at=NOW,
            expires_at=NOW,
            sink=io.BytesIO(),
            rng=rng,
        )


def test_malicious_lifetimes_are_refused_on_opening() -> None:
    rng, alice, bob, _ = world(b"evil-time")
    too_long = forged_message(alice, bob, b"x", rng, expires_at=NOW + 30 * DAY + 1)
    with pytest.raises(InvalidLifetime):
        open_l2(too_long, bob, 0)
    backwards = forged_message(alice, bob, b"x", rng, expires_at=NOW - 1)
    with pytest.raises(InvalidLifetime):
        open_l2(backwards, bob, 0)
    future = forged_message(alice, bob, b"x", rng, created_at=NOW + DAY, expires_at=NOW + 2 * DAY)
    with pytest.raises(MessageFromFuture):
        open_l2(future, bob, 0)


# --- replay -----------------------------------------------------------------------------------


def test_replay_is_refused() -> None:
    rng, alice, bob, _ = world(b"replay")
    l2, _ = seal_l2(alice, [bob], b"once", rng)
    with pytest.raises(ReplayedMessage):
        open_l2(l2, bob, 0, seen=AlwaysSeen())
    memory = SeenSet()
    open_l2(l2, bob, 0, seen=memory)
    with pytest.raises(ReplayedMessage):
        open_l2(l2, bob, 0, seen=memory)
    # the same L2 re-sealed into a fresh L1 (a replay through the inbox) is the same message
    l1 = seal_l1(l2, bob, rng)
    with pytest.raises(ReplayedMessage):
        open_l2(open_l1(l1, bob)[1], bob, 0, seen=memory)


# --- surreptitious forwarding (Davis) ------------------------------------------------------------


def test_rewrap_to_an_outsider_is_not_a_recipient() -> None:
    rng, alice, bob, carol = world(b"davis1")
    l2, _ = seal_l2(alice, [bob], b"I love you, Bob", rng)
    _, l3 = recover_l3(l2, bob, 0)
    forwarded = wrap_l3(l3, carol.targets(), rng)
    with pytest.raises(NotARecipient):
        open_l2(forwarded, carol, 0)


def test_rewrap_to_a_fellow_recipient_is_detected() -> None:
    rng, alice, bob, carol = world(b"davis2")
    l2, _ = seal_l2(alice, [bob, carol], b"to you both", rng)
    _, l3 = recover_l3(l2, bob, 0)
    forwarded = wrap_l3(l3, carol.targets(), rng)
    with pytest.raises(ForwardedMessage):
        open_l2(forwarded, carol, 0)
    # even re-wrapped for the original recipient device itself
    with pytest.raises(ForwardedMessage):
        open_l2(wrap_l3(l3, bob.targets(), rng), bob, 1)


def test_sender_lists_who_reads_it() -> None:
    rng, alice, bob, carol = world(b"notrecip")
    # a sender that wraps to carol's device but signs only bob as recipient
    msg = forged_message(alice, carol, b"x", rng, recipients=[bob.uik_pk])
    with pytest.raises(NotARecipient):
        open_l2(msg, carol, 0)


# --- size limits -----------------------------------------------------------------------------


def test_l2_size_limit_at_the_inbox() -> None:
    rng, alice, bob, _ = world(b"limit")
    l2, _ = seal_l2(alice, [bob], b"x" * 1000, rng)
    l1 = seal_l1(l2, bob, rng)

    def server_key(sek_id: int) -> bytes | None:
        key = bob.server.by_id(sek_id)
        return key.secret if key else None

    with pytest.raises(MessageTooLarge):
        env.open_outer(
            io.BytesIO(l1),
            len(l1),
            server_key=server_key,
            now=NOW,
            max_l2_bytes=len(l2) - 1,
            l2_sink=io.BytesIO(),
        )


def test_body_length_limit_in_a_forged_header() -> None:
    rng, alice, bob, _ = world(b"huge")
    msg = forged_message(alice, bob, b"", rng, body_len=env.MAX_BODY_BYTES + 1)
    with pytest.raises(MessageTooLarge):
        open_l2(msg, bob, 0)


def test_l1_padding_must_be_zero() -> None:
    rng, alice, bob, _ = world(b"padzero")
    l2, _ = seal_l2(alice, [bob], b"x", rng)
    open_l1(build_l1(l2, bob, rng), bob)  # the hand-built L1 is otherwise valid
    with pytest.raises(MalformedData):
        open_l1(build_l1(l2, bob, rng, pad_byte=1), bob)


def test_l1_that_claims_more_than_it_carries() -> None:
    rng, alice, bob, _ = world(b"claims")
    l2, _ = seal_l2(alice, [bob], b"x", rng)
    l1 = build_l1(l2, bob, rng, l2_len=len(l2) + 1_000_000)
    with pytest.raises(MessageTruncated):
        open_l1(l1, bob)


def test_l1_unknown_proof_kind() -> None:
    rng, alice, bob, _ = world(b"auth")
    l2, _ = seal_l2(alice, [bob], b"x", rng)
    with pytest.raises(MalformedData):
        open_l1(build_l1(l2, bob, rng, auth=9), bob)


def test_l1_carries_token_or_stamp() -> None:
    from onionpost.core.crypto.pow import Stamp

    rng, alice, bob, _ = world(b"proofs")
    l2, sealed = seal_l2(alice, [bob], b"x", rng)
    common = {
        "sek_id": bob.binding.sek_id,
        "sek_pk": bob.binding.sek_pk,
        "mailbox_id": bob.mailbox_id,
        "not_after": NOW + DAY,
        "rng": rng,
    }
    for kwargs, kind in (
        ({"token": b"t" * 32}, env.AUTH_TOKEN),
        ({"stamp": Stamp(12, 3, 77)}, env.AUTH_POW),
        ({}, env.AUTH_NONE),
    ):
        sink = io.BytesIO()
        env.seal_outer(io.BytesIO(l2), len(l2), sink=sink, **common, **kwargs)  # type: ignore[arg-type]
        meta, _ = open_l1(sink.getvalue(), bob)
        assert meta.auth_kind == kind
        assert meta.token == (b"t" * 32 if kind == env.AUTH_TOKEN else b"")
        assert meta.stamp == (Stamp(12, 3, 77) if kind == env.AUTH_POW else None)
        assert meta.l2_digest == sealed.digest
    with pytest.raises(CryptoError):
        env.seal_outer(
            io.BytesIO(l2),
            len(l2),
            sink=io.BytesIO(),
            token=b"t" * 32,
            stamp=Stamp(1, 1, 1),
            **common,  # type: ignore[arg-type]
        )
    with pytest.raises(CryptoError):
        env.seal_outer(io.BytesIO(l2), len(l2) + 1, sink=io.BytesIO(), **common)  # type: ignore[arg-type]
