"""The inbox's node API against real HTTP clients: bundles, deliveries, device sessions,
and everything a hostile peer might send."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest

from onionpost.base.clock import SystemClock
from onionpost.core.account import Account, revoke_device
from onionpost.core.crypto import envelope, pow
from onionpost.core.crypto.bundle import KeyBundle, verify_bundle
from onionpost.core.crypto.envelope import StanzaTarget
from onionpost.core.errors import (
    DeviceRefused,
    MalformedData,
    PermanentDeliveryError,
    TemporaryDeliveryError,
    UnknownMailbox,
)
from onionpost.core.wire import KeyUpdate, delivery_frame_head
from onionpost.inbox import api
from onionpost.inbox.postoffice import HandOver, Session, login_message
from onionpost.net.client import DeliveryReceipt, DeviceSession, InboxClient
from onionpost.net.transport import DirectDialer
from onionpost.testing.harness import InboxNode


@pytest.fixture
async def world(tmp_path: Path):
    clock = SystemClock()
    dialer = DirectDialer()
    node = InboxNode(
        tmp_path,
        "b",
        clock,
        dialer,
        inbox={
            "header_timeout": 1.0,
            "request_timeout": 2.0,
            "max_connections": 64,
            "quota_bytes": 400_000,
            "rate_per_mailbox_per_hour": 12,
            "rate_strangers_per_mailbox_per_hour": 6,
        },
    )
    await node.start(worker=False)
    bob = node.provision("bob", "laptop")
    alice_node = InboxNode(tmp_path, "a", clock, dialer)
    alice = alice_node.provision("alice")
    try:
        yield node, bob, alice, dialer
    finally:
        await node.stop()
        node.close()
        alice_node.close()


def _client(node: InboxNode, dialer: DirectDialer) -> InboxClient:
    return InboxClient(dialer, node.onion, isolation="test", timeout=20)


async def _sealed(
    node: InboxNode,
    to: Account,
    sender: Account,
    dialer: DirectDialer,
    *,
    body: bytes = b"Subject: hi\r\n\r\nhello\r\n",
    stamp: bool = True,
    token: bytes | None = None,
    mailbox_id: bytes | None = None,
    expires: int = 3600,
    extra_bits: int = 0,
) -> bytes:
    raw = await _client(node, dialer).bundle(to.local)
    vb = verify_bundle(
        KeyBundle.parse(raw), onion_pk=node.secrets.onion_pk, local=to.local, now=int(time.time())
    )
    now = int(time.time())
    l2 = io.BytesIO()
    inner = envelope.seal_inner(
        sender=sender.sender_keys(),
        targets=[StanzaTarget(d.spk_id, d.spk_pk) for d in vb.devices],
        recipient_uiks=[vb.uik_pk],
        body=body,
        created_at=now,
        expires_at=now + expires,
        sink=l2,
    )
    mid = mailbox_id or vb.mailbox_id
    bits = vb.policy.pow_bits + extra_bits
    st = pow.mint(mid, inner.digest, bits, now) if stamp and token is None else None
    l1 = io.BytesIO()
    l2.seek(0)
    envelope.seal_outer(
        l2,
        inner.length,
        sek_id=vb.sek_id,
        sek_pk=vb.sek_pk,
        mailbox_id=mid,
        not_after=now + expires,
        sink=l1,
        stamp=st,
        token=token,
    )
    return l1.getvalue()


def _session(node: InboxNode, account: Account, dialer: DirectDialer) -> DeviceSession:
    return DeviceSession(
        _client(node, dialer),
        mailbox_id=account.mailbox_id,
        device_id=account.device.device_id,
        sign=account.sign,
        login_message=lambda ch: login_message(
            node.secrets.onion_pk, account.mailbox_id, account.device.device_id, ch
        ),
    )


async def test_bundle_verifies_and_unknown_mailbox_is_404(world) -> None:
    node, bob, _, dialer = world
    raw = await _client(node, dialer).bundle("bob")
    vb = verify_bundle(
        KeyBundle.parse(raw), onion_pk=node.secrets.onion_pk, local="bob", now=int(time.time())
    )
    assert vb.uik_pk == bob.uik_pk and len(vb.devices) == 1
    assert vb.policy.pow_bits == 8
    with pytest.raises(UnknownMailbox) as err:
        await _client(node, dialer).bundle("nobody")
    assert err.value.code == "5.1.1" and "nobody" in str(err.value)


async def test_delivery_is_acknowledged_once_and_dedups(world) -> None:
    node, bob, alice, dialer = world
    l1 = await _sealed(node, bob, alice, dialer)
    first = await _client(node, dialer).deliver(l1)
    again = await _client(node, dialer).deliver(l1)
    assert not first.duplicate and again.duplicate and first.receipt == again.receipt
    pending = await _session(node, bob, dialer).pending()
    assert len(pending) == 1


async def test_long_poll_wakes_promptly_on_delivery(world, monkeypatch) -> None:
    node, bob, alice, dialer = world
    # A long poll that would last an hour: if it returns, the delivery woke it.
    monkeypatch.setattr(
        node.server, "config", dataclasses.replace(node.server.config, longpoll_seconds=3600)
    )
    session = _session(node, bob, dialer)
    await session.login()
    l1 = await _sealed(node, bob, alice, dialer)
    waiter = asyncio.create_task(session.pending(wait=3600))
    await asyncio.sleep(0.3)
    assert not waiter.done()  # waiting, not answered at once with nothing
    await _client(node, dialer).deliver(l1)
    got = await asyncio.wait_for(waiter, 120)  # (only so that a broken wake-up cannot hang)
    assert len(got) == 1


async def test_fetch_and_acknowledge_deletes_the_copy(world) -> None:
    node, bob, alice, dialer = world
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer))
    session = _session(node, bob, dialer)
    (item,) = await session.pending()
    sink = io.BytesIO()
    await session.fetch(item.id, sink, limit=1 << 20)
    assert len(sink.getvalue()) == item.size
    assert await session.acknowledge([item.id]) == 1
    assert await session.pending() == []
    assert node.inbox.store.usage(bob.mailbox_id) == 0


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("no-proof", "5.7.1"),
        ("bad-pow", "5.7.1"),
        ("wrong-token", "5.7.1"),
        ("wrong-mailbox", "5.1.1"),
        ("tampered", "5.7.1"),
        ("garbage", "5.6.0"),
        ("expired", "5.4.7"),
    ],
)
async def test_hostile_deliveries_get_the_right_permanent_code(world, case: str, code: str) -> None:
    node, bob, alice, dialer = world
    if case == "no-proof":
        l1 = await _sealed(node, bob, alice, dialer, stamp=False)
    elif case == "bad-pow":
        # a stamp minted for another message does not pay for this one
        l1 = await _sealed_with_wrong_stamp(node, bob, alice, dialer)
    elif case == "wrong-token":
        l1 = await _sealed(node, bob, alice, dialer, token=b"\x01" * 32)
    elif case == "wrong-mailbox":
        l1 = await _sealed(node, bob, alice, dialer, mailbox_id=b"\x02" * 16)
    elif case == "tampered":
        good = bytearray(await _sealed(node, bob, alice, dialer))
        good[80] ^= 1  # inside the sealed metadata
        l1 = bytes(good)
    elif case == "garbage":
        l1 = b"\x00" * 20_000
    else:
        l1 = await _sealed(node, bob, alice, dialer, expires=0)
        await asyncio.sleep(1.1)
    with pytest.raises(PermanentDeliveryError) as err:
        await _client(node, dialer).deliver(l1)
    assert err.value.code == code, str(err.value)
    assert str(err.value)  # a sentence, not empty


async def _sealed_with_wrong_stamp(node, bob, alice, dialer) -> bytes:
    raw = await _client(node, dialer).bundle("bob")
    vb = verify_bundle(
        KeyBundle.parse(raw), onion_pk=node.secrets.onion_pk, local="bob", now=int(time.time())
    )
    now = int(time.time())
    l2 = io.BytesIO()
    inner = envelope.seal_inner(
        sender=alice.sender_keys(),
        targets=[StanzaTarget(d.spk_id, d.spk_pk) for d in vb.devices],
        recipient_uiks=[vb.uik_pk],
        body=b"x",
        created_at=now,
        expires_at=now + 60,
        sink=l2,
    )
    stamp = pow.mint(vb.mailbox_id, b"\x00" * 32, vb.policy.pow_bits, now)  # wrong message hash
    l1 = io.BytesIO()
    l2.seek(0)
    envelope.seal_outer(
        l2,
        inner.length,
        sek_id=vb.sek_id,
        sek_pk=vb.sek_pk,
        mailbox_id=vb.mailbox_id,
        not_after=now + 60,
        sink=l1,
        stamp=stamp,
    )
    return l1.getvalue()


async def test_oversized_request_is_refused_before_reading(world) -> None:
    node, *_ = world
    reader, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    writer.write(b"POST /v1/deliver HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert b" 413 " in data.split(b"\r\n", 1)[0]
    assert b'"5.3.4"' in data


async def test_quota_full_is_a_temporary_error(world) -> None:
    node, bob, alice, dialer = world
    big = b"Subject: big\r\n\r\n" + b"x" * 150_000
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer, body=big))
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer, body=big))
    with pytest.raises(TemporaryDeliveryError) as err:
        await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer, body=big))
    assert err.value.code == "4.2.2" and "full" in str(err.value)


async def test_a_delivery_refused_for_the_quota_charges_no_rate(world) -> None:
    """The rate charge commits together with the stored envelope (one durable commit per
    delivery, issue 12): a delivery refused because the mailbox is full counts nowhere."""
    node, bob, alice, dialer = world
    charged = "SELECT coalesce(sum(count), 0) FROM rate_counters"
    big = b"Subject: big\r\n\r\n" + b"x" * 150_000
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer, body=big))
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer, body=big))
    before = node.inbox.store.db.scalar(charged)
    assert before > 0
    with pytest.raises(TemporaryDeliveryError):
        await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer, body=big))
    assert node.inbox.store.db.scalar(charged) == before
    assert len(await _session(node, bob, dialer).pending()) == 2


async def test_slow_clients_are_disconnected_and_others_still_served(world) -> None:
    node, bob, alice, dialer = world
    # headers that never finish
    r1, w1 = await asyncio.open_connection("127.0.0.1", node.server.port)
    w1.write(b"POST /v1/deliver HTTP/1.1\r\nHost: x\r\n")
    # a body that never finishes
    r2, w2 = await asyncio.open_connection("127.0.0.1", node.server.port)
    w2.write(b"POST /v1/deliver HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\nabc")
    await asyncio.gather(w1.drain(), w2.drain())
    # meanwhile a real delivery goes through
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer))
    assert await asyncio.wait_for(r1.read(), 5) == b""  # closed after the header timeout
    reply = await asyncio.wait_for(r2.read(), 5)  # answered after the request timeout
    assert b"4." in reply or reply == b""
    for w in (w1, w2):
        w.close()


async def test_connection_flood_gets_503_and_legit_mail_flows(world) -> None:
    node, bob, alice, dialer = world
    conns = await asyncio.gather(
        *(asyncio.open_connection("127.0.0.1", node.server.port) for _ in range(1000))
    )
    replies = await asyncio.gather(*(asyncio.wait_for(reader.read(), 30) for reader, _ in conns))
    for _, writer in conns:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    # Each connection was either admitted (64 at a time; an idle one is closed without a word
    # at its header deadline, which frees its place for a later one) or refused with a
    # complete 503.  How many are refused depends on how fast this machine accepts them.
    admitted = [data for data in replies if data == b""]
    refused = [data for data in replies if data != b""]
    assert len(admitted) >= 64  # the first 64 always find room
    assert refused  # the flood went past the limit
    for data in refused:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), data
        assert int(re.search(rb"Content-Length: (\d+)", head)[1]) == len(body), data
        assert json.loads(body)["code"] == "4.3.2", data
    receipt = await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer))
    assert receipt.receipt


async def test_device_login_refuses_replay_bad_signature_and_revoked(world) -> None:
    node, bob, _, dialer = world
    client = _client(node, dialer)
    ids = {"mailbox": bob.mailbox_id.hex(), "device": bob.device.device_id.hex()}
    ch = await client.call_json("POST", "/v1/device/challenge", ids)
    challenge = bytes.fromhex(ch["challenge"])
    sig = bob.sign(
        login_message(node.secrets.onion_pk, bob.mailbox_id, bob.device.device_id, challenge)
    )
    ok = await client.call_json(
        "POST", "/v1/device/login", {**ids, "challenge": challenge.hex(), "signature": sig.hex()}
    )
    assert len(bytes.fromhex(ok["session"])) == 32
    with pytest.raises(DeviceRefused, match="already used"):  # the same challenge again
        await client.call_json(
            "POST",
            "/v1/device/login",
            {**ids, "challenge": challenge.hex(), "signature": sig.hex()},
        )
    ch2 = bytes.fromhex((await client.call_json("POST", "/v1/device/challenge", ids))["challenge"])
    with pytest.raises(DeviceRefused, match="signature"):
        await client.call_json(
            "POST", "/v1/device/login", {**ids, "challenge": ch2.hex(), "signature": "00" * 64}
        )
    # a second device, then revoked: its session stops working at once
    phone = node.add_device(bob, "phone")
    phone_session = _session(node, phone, dialer)
    await phone_session.pending()
    revoke_device(bob, phone.device.device_id, now=int(time.time()))
    await _session(node, bob, dialer).publish(KeyUpdate(device_list=bob.device_list))
    with pytest.raises(DeviceRefused):
        await phone_session.pending()


async def test_rate_limit_per_mailbox_is_a_temporary_error(world) -> None:
    node, bob, alice, dialer = world
    token = b"\x07" * 32
    node.inbox.store.add_token(bob.mailbox_id, node.inbox.token_hash(token), 0)
    for i in range(12):
        await _client(node, dialer).deliver(
            await _sealed(
                node, bob, alice, dialer, token=token, body=f"Subject: {i}\r\n\r\nx".encode()
            )
        )
    with pytest.raises(TemporaryDeliveryError) as err:
        await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer, token=token))
    assert err.value.code == "4.7.0" and "too much mail" in str(err.value)


async def test_strangers_cannot_use_up_the_contacts_budget(world) -> None:
    """Refused envelopes charge nothing; stamped strangers fill only their own bucket."""
    node, bob, alice, dialer = world
    client = _client(node, dialer)
    window = int(time.time()) // 3600 * 3600
    for i in range(30):  # three times the whole mailbox budget, none with a proof
        with pytest.raises(PermanentDeliveryError):
            await client.deliver(
                await _sealed(node, bob, alice, dialer, stamp=False, body=f"{i}".encode())
            )
    assert node.inbox.store.rate_count("mailbox", bob.mailbox_id, window) == 0
    for i in range(6):  # the strangers' budget at the required difficulty
        await client.deliver(await _sealed(node, bob, alice, dialer, body=f"s{i}".encode()))
    with pytest.raises(TemporaryDeliveryError) as err:
        await client.deliver(await _sealed(node, bob, alice, dialer, body=b"one too many"))
    assert err.value.code == "4.7.0"
    # a stranger who pays one bit more is counted apart from the flood
    await client.deliver(await _sealed(node, bob, alice, dialer, extra_bits=1, body=b"dear"))
    # and a contact's token still opens the door
    token = b"\x08" * 32
    node.inbox.store.add_token(bob.mailbox_id, node.inbox.token_hash(token), 0)
    await client.deliver(await _sealed(node, bob, alice, dialer, token=token, body=b"hi"))
    assert node.inbox.store.rate_count("mailbox", bob.mailbox_id, window) == 1
    assert len(await _session(node, bob, dialer).pending()) == 6 + 1 + 1


async def test_oversized_headers_are_refused(world) -> None:
    node, *_ = world
    reader, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.split(b" ", 2)[1] == b"400", data[:80]


async def test_an_expired_login_challenge_is_refused(world) -> None:
    node, bob, _, _ = world
    inbox = node.inbox
    now = int(time.time())
    challenge, _ = inbox.challenge(bob.mailbox_id, bob.device.device_id, now)
    sig = bob.sign(
        login_message(node.secrets.onion_pk, bob.mailbox_id, bob.device.device_id, challenge)
    )
    with pytest.raises(DeviceRefused, match="expired"):
        inbox.login(
            bob.mailbox_id, bob.device.device_id, challenge=challenge, signature=sig, now=now + 3600
        )


async def test_errors_are_json_with_codes(world) -> None:
    node, *_ = world
    reader, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    writer.write(b"GET /v1/bundle/nobody HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 404 " in head
    parsed = json.loads(body)
    assert parsed["status"] == "permanent" and parsed["code"] == "5.1.1"


async def _raw(node: InboxNode, request: bytes) -> bytes:
    """Send raw bytes to the node API and read until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


def _headers(reply: bytes) -> dict[str, str]:
    head = reply.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head)}


async def test_no_answer_names_the_server_software(world) -> None:
    node, *_ = world
    replies = [
        await _raw(node, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        await _raw(node, b"GET /v1/bundle/nobody HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        await _raw(node, b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        await _raw(node, b"GET /v1/health HTTP/1.1\r\nBad Header\x00: y\r\n\r\n"),
    ]
    for reply in replies:
        assert reply.startswith(b"HTTP/1."), reply[:80]
        assert "server" not in _headers(reply), reply[:300]


async def test_a_garbage_request_gets_a_short_fixed_answer(world) -> None:
    node, *_ = world
    marker = b"ECHO-ME-" * 8192  # 64 KiB
    for request in (
        b"GET /" + marker + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/health HTTP/1.1\r\nX-Junk\x01: " + marker + b"\r\n\r\n",
        b"\x16\x03\x01" + marker + b"\r\n\r\n",  # a TLS hello, or any other protocol
    ):
        reply = await _raw(node, request)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0], head
        assert len(reply) < 1024 and b"ECHO-ME" not in reply
        assert json.loads(body) == {
            "status": "permanent",
            "code": "5.5.2",
            "reason": "bad-request",
            "message": "The request is not valid HTTP.",
        }


async def test_an_unknown_mailbox_name_is_repeated_only_when_valid(world) -> None:
    node, *_ = world
    plain = await _raw(
        node, b"GET /v1/bundle/Nobody HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert "'nobody'" in json.loads(plain.partition(b"\r\n\r\n")[2])["message"]
    odd = b"%3Cscript%3E" + b"z" * 4000
    reply = await _raw(
        node, b"GET /v1/bundle/" + odd + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body["code"] == "5.1.1" and "zzzz" not in body["message"] and "<" not in body["message"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"a string"'])
async def test_malformed_json_on_the_device_api_is_a_permanent_400(world, body: bytes) -> None:
    node, *_ = world
    reply = await _raw(
        node,
        b"POST /v1/device/challenge HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body,
    )
    head, _, answer = reply.partition(b"\r\n\r\n")
    assert b" 400 " in head.split(b"\r\n")[0], head
    parsed = json.loads(answer)
    assert parsed["status"] == "permanent" and parsed["code"] == "5.5.2"
    assert parsed["reason"] == "bad-request"


async def test_a_sender_dying_mid_upload_is_one_info_line(world, caplog) -> None:
    node, bob, alice, dialer = world
    caplog.set_level(logging.DEBUG)
    _, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    writer.write(
        b"POST /v1/deliver HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"x" * 70_000
    )
    await writer.drain()
    writer.close()  # what the kernel does for a sender that is killed mid-upload
    for _ in range(1500):  # a guard against hanging, not a deadline
        if any("went away" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO, caplog.text
    assert "POST /v1/deliver" in gone[0].getMessage() and "70000 of 200000" in gone[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    # and the inbox goes on accepting mail
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer))


async def test_a_device_gone_during_its_long_poll_is_one_info_line(world, caplog) -> None:
    """A device that stops while its pending-mail long-poll waits: when mail arrives the
    answer meets a closed connection; one info line, no traceback, and the inbox goes on."""
    node, bob, alice, dialer = world
    caplog.set_level(logging.DEBUG)
    session = _session(node, bob, dialer)
    await session.login()
    assert session._token is not None
    _, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    writer.write(
        b"GET /v1/device/pending-mail?wait=20&count=16&bytes=1048576 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer " + session._token.hex().encode() + b"\r\n\r\n"
    )
    await writer.drain()
    await asyncio.sleep(0.3)  # the inbox is waiting for mail
    writer.transport.abort()  # the device is killed
    await asyncio.sleep(0.1)
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer))
    for _ in range(1500):  # a guard against hanging, not a deadline
        if any("went away" in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    answer = await session.pending_mail(
        wait=0, count=16, limit=1 << 20, sink=lambda i: io.BytesIO()
    )
    assert answer is not None and len(answer[1]) == 1  # still there for the next sync


async def test_deliveries_ready_together_share_one_commit(world) -> None:
    """Group commit at the accept (Inbox.accept_many, which the node API's deliveries go
    through): several deliveries are stored by one COMMIT, each in its own savepoint, so a
    refused one spoils no other and a repeat within the batch is told apart as a duplicate."""
    node, bob, alice, dialer = world
    one = await _sealed(node, bob, alice, dialer, body=b"Subject: one\r\n\r\n1\r\n")
    two = await _sealed(node, bob, alice, dialer, body=b"Subject: two\r\n\r\n2\r\n")
    stray = await _sealed(node, bob, alice, dialer, mailbox_id=b"\x02" * 16)
    now = int(time.time())
    batch = [
        (node.inbox.unwrap(io.BytesIO(l1), len(l1), now=now), now) for l1 in (one, stray, two, one)
    ]
    commits: list[str] = []
    woken: list[bytes] = []
    node.inbox.on_spooled.append(lambda mailbox_id, devices: woken.append(mailbox_id))
    node.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        results = node.inbox.accept_many(batch)
    finally:
        node.db.conn.set_trace_callback(None)
        for unwrapped, _ in batch:
            unwrapped.l2.close()
    assert len(commits) == 1
    first, refused, second, again = results
    assert isinstance(refused, UnknownMailbox)
    assert not isinstance(first, Exception) and not first.duplicate
    assert not isinstance(second, Exception) and not second.duplicate
    assert not isinstance(again, Exception) and again.duplicate
    assert again.receipt == first.receipt
    assert woken == [bob.mailbox_id, bob.mailbox_id]  # told only of the stored two, after
    assert len(await _session(node, bob, dialer).pending()) == 2


async def test_a_delivery_refused_late_in_a_batch_leaves_no_trace(world) -> None:
    """A delivery refused after its sender's rate buckets were charged (here: the quota,
    checked last) takes its charge back with it; the deliveries around it are stored and
    charged once each, in the batch's one commit."""
    node, bob, alice, dialer = world
    one = await _sealed(node, bob, alice, dialer, body=b"Subject: one\r\n\r\n1\r\n")
    big = await _sealed(node, bob, alice, dialer, body=b"Subject: big\r\n\r\n" + b"x" * 100_000)
    two = await _sealed(node, bob, alice, dialer, body=b"Subject: two\r\n\r\n2\r\n")
    now = int(time.time())
    batch = [(node.inbox.unwrap(io.BytesIO(l1), len(l1), now=now), now) for l1 in (one, big, two)]
    small = batch[0][0].meta.l2_len + batch[2][0].meta.l2_len
    assert batch[1][0].meta.l2_len > small
    node.inbox.store.set_policy(
        bob.mailbox_id, accepts_strangers=True, pow_bits=None, quota_bytes=small
    )
    stamp = batch[0][0].meta.stamp
    assert stamp is not None
    try:
        first, refused, second = node.inbox.accept_many(batch)
    finally:
        for unwrapped, _ in batch:
            unwrapped.l2.close()
    assert isinstance(refused, TemporaryDeliveryError) and refused.code == "4.2.2"
    assert not isinstance(first, Exception) and not isinstance(second, Exception)
    window = now - now % 3600
    assert node.inbox.store.rate_count("strangers", bytes([stamp.bits]), window) == 2
    assert node.inbox.store.usage(bob.mailbox_id) == small
    assert len(await _session(node, bob, dialer).pending()) == 2


async def test_hand_overs_ready_together_share_one_commit(world) -> None:
    """Group commit at the hand-over (Inbox.submit_many, which the node API's ``POST
    /v1/device/submit`` goes through): several are queued by one COMMIT, each in its own
    savepoint, so a refused one spoils no other, a repeated submission key within the batch
    gets the row the first one queued, and the outbox's waiting delivered marks ride it."""
    node, bob, _, _ = world
    me = Session(bob.mailbox_id, bob.device.device_id)
    now = int(time.time())

    def hand_over(key: str, *, expires_at: int = now + 3600) -> HandOver:
        return HandOver(
            me,
            destination=f"alice@{node.onion}.onion",
            sealed=b"sealed " + key.encode(),
            msg_id=b"\x01" * 16,
            expires_at=expires_at,
            message_ref="",
            submission_key=key,
            now=now,
        )

    commits: list[str] = []
    node.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        batch = [hand_over("k1"), hand_over("late", expires_at=now), hand_over("k2")]
        first, refused, second, again = node.inbox.submit_many([*batch, hand_over("k1")])
        assert len(commits) == 1
        outbox = node.inbox.outbox
        assert isinstance(refused, MalformedData)
        assert isinstance(first, int) and isinstance(second, int) and first != second
        assert again == first
        assert outbox.envelope(first) == b"sealed k1" and outbox.envelope(second) == b"sealed k2"
        assert outbox.queued_count() == 2

        outbox.mark_delivered_later([first], now=now)  # as the worker does
        commits.clear()
        (third,) = node.inbox.submit_many([hand_over("k3")])
        assert len(commits) == 1
    finally:
        node.db.conn.set_trace_callback(None)
    assert outbox.get(first).state == "delivered"  # type: ignore[union-attr]
    assert outbox.committed() == [first] and outbox.marks_waiting() == 0
    assert isinstance(third, int) and outbox.queued_count() == 2


async def test_concurrent_hand_overs_are_each_queued_once(world) -> None:
    """Through the node API, hand-overs sent together (which may share a commit) are each
    answered with their own row; a repeated submission key with the row already queued."""
    node, bob, _, dialer = world
    session = _session(node, bob, dialer)
    expires_at = int(time.time()) + 3600

    async def submit(key: str) -> int:
        return await session.submit(
            destination=f"alice@{node.onion}.onion",
            envelope=b"sealed " + key.encode(),
            msg_id=b"\x02" * 16,
            expires_at=expires_at,
            ref="",
            key=key,
        )

    ids = await asyncio.gather(*(submit(f"k{i}") for i in range(6)))
    assert len(set(ids)) == 6
    assert [node.inbox.outbox.envelope(i) for i in ids] == [b"sealed k%d" % i for i in range(6)]
    again = await asyncio.gather(submit("k0"), submit("k5"), submit("k6"))
    assert again[:2] == [ids[0], ids[5]] and again[2] not in ids
    assert node.inbox.outbox.queued_count() == 7


async def test_concurrent_deliveries_are_each_accepted_once(world) -> None:
    """Through the node API, deliveries that arrive together (and may share a commit) are
    each answered and stored once; the same envelope twice is a duplicate the second time."""
    node, bob, alice, dialer = world
    l1s = [
        await _sealed(node, bob, alice, dialer, body=b"Subject: %d\r\n\r\nx\r\n" % i)
        for i in range(5)
    ]
    answers = await asyncio.gather(*(_client(node, dialer).deliver(l1) for l1 in l1s))
    assert not any(a.duplicate for a in answers)
    assert len({a.receipt for a in answers}) == 5
    again = await asyncio.gather(*(_client(node, dialer).deliver(l1) for l1 in l1s[:2]))
    assert all(a.duplicate for a in again)
    assert len(await _session(node, bob, dialer).pending()) == 5


async def _one_at_a_time(session: DeviceSession, pending: list[Any]) -> dict[int, bytes]:
    """Each pending envelope as the one-at-a-time route gives it."""
    singles = {}
    for m in pending:
        one = io.BytesIO()
        await session.fetch(m.id, one, limit=1 << 20)
        singles[m.id] = one.getvalue()
    return singles


async def test_several_messages_are_fetched_in_one_request(world) -> None:
    """GET /v1/device/messages: the envelopes asked for, in order, each as the one-at-a-time
    route gives it; an id not spooled for this device is left out; too many ids is refused."""
    node, bob, alice, dialer = world
    for i in range(3):
        await _client(node, dialer).deliver(
            await _sealed(node, bob, alice, dialer, body=b"Subject: %d\r\n\r\nx\r\n" % i)
        )
    session = _session(node, bob, dialer)
    pending = await session.pending()
    assert len(pending) == 3
    singles = await _one_at_a_time(session, pending)
    sinks: dict[int, io.BytesIO] = {}
    wanted = [pending[2], pending[0], dataclasses.replace(pending[1], id=10_000)]
    got = await session.fetch_many(wanted, lambda i: sinks.setdefault(i, io.BytesIO()))
    assert got == [pending[2].id, pending[0].id]
    assert {i: s.getvalue() for i, s in sinks.items()} == {i: singles[i] for i in got}
    with pytest.raises(PermanentDeliveryError):
        await session.fetch_many(
            [dataclasses.replace(pending[0], id=i) for i in range(1, 66)], lambda i: io.BytesIO()
        )


async def test_pending_mail_carries_the_first_envelopes_with_the_list(world) -> None:
    """GET /v1/device/pending-mail: the list ``pending`` gives, and the envelopes of its
    first messages, byte for byte the ones the one-at-a-time route gives, as many as fit in
    ``count`` and ``bytes``; a long-poll that returns because mail arrived carries it; an
    unknown route is a 404, which the session takes as "ask pending"."""
    node, bob, alice, dialer = world
    session = _session(node, bob, dialer)

    def sinks() -> tuple[dict[int, io.BytesIO], Any]:
        got: dict[int, io.BytesIO] = {}
        return got, lambda i: got.setdefault(i, io.BytesIO())

    # a long-poll on an empty inbox returns with the mail that arrives meanwhile
    out, sink = sinks()
    poll = asyncio.ensure_future(session.pending_mail(wait=20, count=16, limit=1 << 20, sink=sink))
    await asyncio.sleep(0.2)
    assert not poll.done()
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer))
    answer = await asyncio.wait_for(poll, 30)
    assert answer is not None
    listed, carried = answer
    assert [m.id for m in listed] == carried and len(carried) == 1
    for i in range(1, 3):
        await _client(node, dialer).deliver(
            await _sealed(node, bob, alice, dialer, body=b"Subject: %d\r\n\r\nx\r\n" % i)
        )
    pending = await session.pending()
    assert len(pending) == 3
    singles = await _one_at_a_time(session, pending)
    out, sink = sinks()
    answer = await session.pending_mail(wait=0, count=16, limit=1 << 20, sink=sink)
    assert answer is not None
    assert answer == (pending, [m.id for m in pending])
    assert {i: s.getvalue() for i, s in out.items()} == singles
    # count and bytes bound what is carried; the list is whole
    out, sink = sinks()
    answer = await session.pending_mail(wait=0, count=2, limit=1 << 20, sink=sink)
    assert answer == (pending, [m.id for m in pending[:2]])
    limit = pending[0].size + pending[1].size - 1
    answer = await session.pending_mail(wait=0, count=16, limit=limit, sink=sink)
    assert answer == (pending, [pending[0].id])
    answer = await session.pending_mail(wait=0, count=0, limit=1 << 20, sink=sink)
    assert answer == (pending, [])
    r = await session._authorized("GET", "/v1/device/pending-mail?count=65", again=False)
    assert r.status == 400
    # an inbox without the route (an older one): 404, and the session stops asking
    request = session.client.request

    async def older(method: str, path: str, **kw: Any) -> Any:
        return await request(method, path.replace("/pending-mail?", "/no-such-route?"), **kw)

    session.client.request = older  # type: ignore[method-assign]
    assert await session.pending_mail(wait=0, count=16, limit=1 << 20, sink=sink) is None
    assert not session.pending_mail_served
    session.client.request = request  # type: ignore[method-assign]
    assert await session.pending_mail(wait=0, count=16, limit=1 << 20, sink=sink) is None


async def test_a_pending_list_carries_the_acknowledgement_of_what_was_filed(
    world, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ack`` on GET /v1/device/pending-mail (and pending): those copies are acknowledged
    before the list is made (left out of it, no longer served, deleted as POST /ack's are)
    and the answer says how many it took; without ``ack`` the answer is as before; a
    malformed or over-long ``ack`` is a 400 and acknowledges nothing; an inbox that ignores
    the parameter (one from before it) gets the acknowledgement in a request of its own."""
    node, bob, alice, dialer = world
    for i in range(4):
        await _client(node, dialer).deliver(
            await _sealed(node, bob, alice, dialer, body=b"Subject: %d\r\n\r\nx\r\n" % i)
        )
    session = _session(node, bob, dialer)
    pending = await session.pending()
    assert len(pending) == 4
    got: dict[int, io.BytesIO] = {}

    def sink(i: int) -> io.BytesIO:
        return got.setdefault(i, io.BytesIO())

    answer = await session.pending_mail(
        wait=0, count=16, limit=1 << 20, sink=sink, ack=[pending[0].id, 999_999]
    )
    assert answer == (pending[1:], [m.id for m in pending[1:]])
    assert pending[0].id not in got
    with pytest.raises(TemporaryDeliveryError, match="No such message"):
        await session.fetch(pending[0].id, io.BytesIO(), limit=1 << 20)
    # on the wire: the count is in the list's answer only when it was asked for
    r = await session._authorized("GET", f"/v1/device/pending?ack={pending[1].id}", again=False)
    assert r.status == 200
    assert json.loads(r.body)["acknowledged"] == 1
    assert [m["id"] for m in json.loads(r.body)["messages"]] == [m.id for m in pending[2:]]
    r = await session._authorized("GET", "/v1/device/pending", again=False)
    assert "acknowledged" not in json.loads(r.body)
    for bad in ("x", "1,,2", ",".join(str(n) for n in range(65))):
        r = await session._authorized(
            "GET", f"/v1/device/pending-mail?count=1&ack={bad}", again=False
        )
        assert r.status == 400, bad
        assert (
            "'ack'" in json.loads(r.body)["message"]
            or "Acknowledge" in json.loads(r.body)["message"]
        )
    assert [m.id for m in await session.pending()] == [m.id for m in pending[2:]]
    assert node.inbox.store.acks_waiting() == 2
    node.server._flush_acks()
    assert node.inbox.store.acks_waiting() == 0
    # an older inbox (it ignores `ack`): acknowledged with POST /ack, left out of the list
    monkeypatch.setattr(api, "_ack_ids", lambda raw: None)
    got.clear()
    answer = await session.pending_mail(
        wait=0, count=16, limit=1 << 20, sink=sink, ack=[pending[2].id]
    )
    assert answer == (pending[3:], [pending[3].id])
    monkeypatch.undo()
    assert [m.id for m in await session.pending()] == [pending[3].id]
    # more than a list may carry go as a request of their own first
    answer = await session.pending_mail(
        wait=0, count=16, limit=1 << 20, sink=sink, ack=[pending[3].id, *range(10**6, 10**6 + 64)]
    )
    assert answer == ([], [])


async def test_a_session_the_inbox_forgot_is_dropped_and_a_new_one_opened(world) -> None:
    """An inbox that restarted or expired the session answers 401: a fetch is refused and
    forgets the session; the next request logs in again; a request that may be repeated
    (a hand-over, a key publication) is sent once more in the new session at once."""
    node, bob, alice, dialer = world
    await _client(node, dialer).deliver(await _sealed(node, bob, alice, dialer))
    session = _session(node, bob, dialer)
    (item,) = await session.pending()
    forgotten = b"\x5a" * 32  # a session token this inbox never issued
    session._token = forgotten
    with pytest.raises(DeviceRefused):
        await session.fetch(item.id, io.BytesIO(), limit=1 << 20)
    assert session._token is None
    sinks: dict[int, io.BytesIO] = {}
    assert await session.fetch_many([item], lambda i: sinks.setdefault(i, io.BytesIO())) == [
        item.id
    ]
    assert len(sinks[item.id].getvalue()) == item.size
    session._token = forgotten
    r = await session._authorized("GET", "/v1/device/policy", again=True)
    assert r.status == 200 and session._token not in (None, forgotten)


# -- several deliveries in one request (POST /v1/deliveries) -----------------------------------


def _framed(*envelopes: bytes) -> tuple[io.BytesIO, int]:
    body = b"".join(delivery_frame_head(len(e)) + e for e in envelopes)
    return io.BytesIO(body), len(body)


async def test_several_deliveries_are_judged_one_by_one_and_stored_in_one_commit(world) -> None:
    """Each envelope of a ``POST /v1/deliveries`` gets the answer ``/v1/deliver`` would have
    given it alone, in order: stored, refused for an unknown mailbox, refused as corrupt, a
    duplicate of one before it.  The stored ones share one COMMIT, before the answer."""
    node, bob, alice, dialer = world
    one = await _sealed(node, bob, alice, dialer, body=b"Subject: one\r\n\r\n1\r\n")
    two = await _sealed(node, bob, alice, dialer, body=b"Subject: two\r\n\r\n2\r\n")
    stray = await _sealed(node, bob, alice, dialer, mailbox_id=b"\x02" * 16)
    corrupt = one[:200] + bytes(len(one) - 200)
    commits: list[str] = []
    node.db.conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    try:
        results = await _client(node, dialer).deliver_many(
            _framed(one, stray, corrupt, two, one), 5
        )
    finally:
        node.db.conn.set_trace_callback(None)
    assert results is not None and len(commits) == 1
    first, unknown, broken, second, again = results
    assert isinstance(first, DeliveryReceipt) and not first.duplicate
    assert isinstance(unknown, UnknownMailbox) and unknown.code == "5.1.1"
    assert isinstance(broken, PermanentDeliveryError) and broken.code.startswith("5.")
    assert isinstance(second, DeliveryReceipt) and not second.duplicate
    assert isinstance(again, DeliveryReceipt) and again.duplicate
    assert again.receipt == first.receipt
    # The same envelope alone gets the same receipt: a batch and a single delivery agree.
    assert (await _client(node, dialer).deliver(two)).receipt == second.receipt
    assert len(await _session(node, bob, dialer).pending()) == 2


async def test_a_batch_past_the_rate_limit_stores_what_fits_and_defers_the_rest(world) -> None:
    """Limits count envelope by envelope: strangers may send bob 6 an hour here, so of 8
    stamped envelopes in one request 6 are stored and 2 refused for now (4.7.0, 429)."""
    node, bob, alice, dialer = world
    envelopes = [
        await _sealed(node, bob, alice, dialer, body=f"Subject: s{i}\r\n\r\n{i}\r\n".encode())
        for i in range(8)
    ]
    results = await _client(node, dialer).deliver_many(_framed(*envelopes), 8)
    assert results is not None
    assert all(isinstance(r, DeliveryReceipt) for r in results[:6])
    for refused in results[6:]:
        assert isinstance(refused, TemporaryDeliveryError) and refused.code == "4.7.0"
    assert len(await _session(node, bob, dialer).pending()) == 6


@pytest.mark.parametrize(
    "case",
    ["empty", "short head", "empty envelope", "past the end", "trailing bytes", "too many"],
)
async def test_a_badly_framed_batch_is_refused_whole_and_stores_nothing(world, case: str) -> None:
    node, bob, alice, dialer = world
    good = await _sealed(node, bob, alice, dialer)
    body, count = {
        "empty": (b"", 0),
        "short head": (delivery_frame_head(len(good)) + good + b"\x00\x00", 1),
        "empty envelope": (delivery_frame_head(len(good)) + good + delivery_frame_head(0), 2),
        "past the end": (delivery_frame_head(len(good) + 1) + good, 1),
        "trailing bytes": (delivery_frame_head(len(good)) + good + b"\x00" * 5, 1),
        "too many": (b"".join(delivery_frame_head(1) + b"x" for _ in range(65)), 65),
    }[case]
    with pytest.raises(PermanentDeliveryError) as err:
        await _client(node, dialer).deliver_many((io.BytesIO(body), len(body)), count)
    assert err.value.code.startswith("5.") and err.value.reason == "MalformedData"
    assert await _session(node, bob, dialer).pending() == []


async def test_an_oversized_batch_is_refused_before_reading(world) -> None:
    node, *_ = world
    reader, writer = await asyncio.open_connection("127.0.0.1", node.server.port)
    head = f"POST /v1/deliveries HTTP/1.1\r\nHost: x\r\nContent-Length: {(8 << 20) + 1}\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(65536), 5)
    writer.close()
    assert b" 413 " in data.split(b"\r\n", 1)[0]


async def test_a_batch_larger_than_the_memory_spool_is_opened_from_disk(world) -> None:
    """The batch's body spills to a temporary file past 256 KiB; each envelope is opened
    from its place there, and arrives whole."""
    node, bob, alice, dialer = world
    bodies = [b"Subject: big %d\r\n\r\n" % i + bytes([65 + i]) * 150_000 for i in range(2)]
    envelopes = [await _sealed(node, bob, alice, dialer, body=b) for b in bodies]
    assert sum(map(len, envelopes)) > 256 * 1024
    results = await _client(node, dialer).deliver_many(_framed(*envelopes), 2)
    assert results is not None and all(isinstance(r, DeliveryReceipt) for r in results)
    assert len(await _session(node, bob, dialer).pending()) == 2
