"""The quota decision (onionpost/core/quota.py), and that the inbox, its store and the wire ask
it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from onionpost.core import quota
from onionpost.core.errors import (
    MessageTooLarge,
    PermanentDeliveryError,
    QuotaExceeded,
    TemporaryDeliveryError,
)
from onionpost.core.wire import refusal
from onionpost.store.db import Database
from onionpost.store.inbox import InboxStore

MiB = 1 << 20


@pytest.mark.parametrize(
    ("own", "default", "limit"),
    [
        (None, 2048 * MiB, 2048 * MiB),  # no quota of its own: the inbox's default
        (0, 2048 * MiB, 2048 * MiB),  # an old row's 0 means the same
        (10 * MiB, 2048 * MiB, 10 * MiB),
        (4096 * MiB, 2048 * MiB, 4096 * MiB),  # an own quota may be larger than the default
    ],
)
def test_limit(own: int | None, default: int, limit: int) -> None:
    assert quota.limit(own, default) == limit


@pytest.mark.parametrize(
    ("used", "size", "limit", "fits"),
    [
        (0, 0, 0, True),
        (0, 1, 0, False),
        (0, 10 * MiB, 10 * MiB, True),  # exactly full is allowed
        (1, 10 * MiB, 10 * MiB, False),
        (10 * MiB, 0, 10 * MiB, True),  # a duplicate or empty message still fits
        (5 * MiB, 5 * MiB - 1, 10 * MiB, True),
        (11 * MiB, 0, 10 * MiB, False),  # over already (the quota was lowered)
    ],
)
def test_refusal(used: int, size: int, limit: int, fits: bool) -> None:
    got = quota.refusal(used=used, size=size, quota=limit)
    if fits:
        assert got is None
    else:
        assert isinstance(got, QuotaExceeded) and got.temporary and got.code == "4.2.2"
        assert f"{used // MiB} MiB of {limit // MiB} MiB used" in str(got)


@pytest.mark.parametrize(
    ("exc", "full"),
    [
        (QuotaExceeded(), True),
        (TemporaryDeliveryError.from_error(QuotaExceeded()), True),  # carried across (inbox.py)
        (TemporaryDeliveryError("busy"), False),
        (PermanentDeliveryError.from_error(MessageTooLarge()), False),
        (MessageTooLarge(), False),
    ],
)
def test_is_full_and_the_wire_status(exc: QuotaExceeded, full: bool) -> None:
    assert quota.is_full(exc) is full
    status, body = refusal(exc)
    assert (status == quota.FULL_STATUS) is full
    if full:
        assert body["status"] == "temporary" and body["code"] == "4.2.2"


def _accept(store: InboxStore, digest: bytes, size: int, *, now: int, limit: int) -> bool:
    return not store.accept_sealed(
        mailbox_id=b"M" * 16,
        digest=digest,
        size=size,
        source=io.BytesIO(b"x" * size),
        device_ids=[],  # spooled for no device: the quota counts the stored copy
        receipt="r",
        now=now,
        spool_until=now + 100,
        dedup_until=now + 1000,
        quota_bytes=limit,
    ).duplicate


def test_the_store_refuses_what_quota_refuses_and_prunes_first() -> None:
    db = Database(":memory:", ("inbox",), record_key=b"k" * 32)
    try:
        db.conn.execute(
            "INSERT INTO mailboxes (mailbox_id, local, uik_pk, binding, device_list,"
            " device_list_version, created_at) VALUES (?, 'alice', x'00', x'00', x'', 0, 0)",
            (b"M" * 16,),
        )
        store = InboxStore(db)
        assert _accept(store, b"a" * 32, 600, now=0, limit=1000)
        with pytest.raises(QuotaExceeded, match="mailbox is full"):
            _accept(store, b"b" * 32, 401, now=1, limit=1000)
        assert _accept(store, b"b" * 32, 400, now=1, limit=1000)  # exactly full
        assert store.usage(b"M" * 16) == 1000
        # once the first ones expired, the same refusal prunes them and the mail fits
        assert _accept(store, b"c" * 32, 1000, now=500, limit=1000)
        assert store.usage(b"M" * 16) == 1000
    finally:
        db.close()


def test_the_disk_reserve_is_kept_free() -> None:
    mib = 1 << 20
    assert not quota.short_of_disk(free=100 * mib, incoming=10 * mib, reserve=64 * mib)
    assert quota.short_of_disk(free=70 * mib, incoming=10 * mib, reserve=64 * mib)
    assert not quota.short_of_disk(free=0, incoming=10 * mib, reserve=0)  # 0: no reserve


def test_disk_room_asks_the_file_system_and_never_fails_on_it(tmp_path: Path) -> None:
    from onionpost.store.disk import DiskRoom

    assert DiskRoom(tmp_path, reserve_mib=0).short_by(1 << 40, refusing="mail") is None
    assert (
        DiskRoom(tmp_path, reserve_mib=1 << 40).short_by(0, refusing="mail") is not None
    )  # a real statvfs
    assert DiskRoom(tmp_path, reserve_mib=64, free=lambda _p: 70 << 20).short_by(
        10 << 20, refusing="mail"
    ) == (70 << 20)

    def broken(_path: Path) -> int:
        raise OSError("no such file system")

    assert DiskRoom(tmp_path, reserve_mib=64, free=broken).short_by(10, refusing="mail") is None


def test_the_usage_row_follows_every_way_sealed_mail_comes_and_goes() -> None:
    """The quota check reads one row kept by triggers, not a sum over the backlog; it must
    equal that sum whatever added or removed envelopes, and leave out those every device
    acknowledged whose deletion waits for the next commit."""
    db = Database(":memory:", ("inbox",), record_key=b"k" * 32)
    mb, dev = b"M" * 16, b"d" * 16
    try:
        db.conn.execute(
            "INSERT INTO mailboxes (mailbox_id, local, uik_pk, binding, device_list,"
            " device_list_version, created_at) VALUES (?, 'alice', x'00', x'00', x'', 0, 0)",
            (mb,),
        )
        db.conn.execute(
            "INSERT INTO devices (mailbox_id, device_id, name, dsk_seq, dsk_pk)"
            " VALUES (?, ?, 'laptop', 0, x'00')",
            (mb, dev),
        )
        store = InboxStore(db)

        def summed() -> int:
            return int(db.scalar("SELECT coalesce(sum(size), 0) FROM sealed"))

        for i, size in enumerate((100, 200, 300, 400)):
            store.accept_sealed(
                mailbox_id=mb, digest=bytes([i]) * 32, size=size,
                source=io.BytesIO(b"x" * size), device_ids=[dev] if i < 3 else [],
                receipt="r", now=0, spool_until=10 if i == 0 else 1000,
                dedup_until=2000, quota_bytes=10_000,
            )  # fmt: skip
        assert store.usage(mb) == summed() == 1000
        pending = [item[0] for item in db.all("SELECT id FROM spool ORDER BY id")]
        assert store.acknowledge_later(mb, dev, pending[1:2]) == 1  # the 200 bytes
        assert store.usage(mb) == 800 and summed() == 1000  # hidden, not yet deleted
        store.flush_acks()
        assert store.usage(mb) == summed() == 800
        store.acknowledge(mb, dev, pending[2:3])  # the 300 bytes
        assert store.usage(mb) == summed() == 500
        store.prune(now=100)  # the first envelope (100 bytes) expired
        assert store.usage(mb) == summed() == 400
        db.conn.execute("UPDATE sealed SET size = 450")  # no code does; the trigger follows
        assert store.usage(mb) == summed() == 450
        db.conn.execute("DELETE FROM mailboxes WHERE mailbox_id = ?", (mb,))
        assert store.usage(mb) == summed() == 0
    finally:
        db.close()
