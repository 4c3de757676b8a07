"""Key lifecycle between real inboxes and devices: rotation, publication, retention, revocation."""

from __future__ import annotations

import time
from email.message import EmailMessage
from pathlib import Path

import pytest

from onionpost.base.clock import FakeClock
from onionpost.base.config import KeysConfig
from onionpost.core.account import revoke_device
from onionpost.core.crypto.bundle import KeyBundle, verify_bundle
from onionpost.core.crypto.keys import DeviceList, RevokedDevice
from onionpost.core.errors import DeviceRefused
from onionpost.core.wire import KeyUpdate
from onionpost.net.transport import DirectDialer
from onionpost.testing.harness import DeviceNode, InboxNode

DAY = 86400


def note(sender: DeviceNode, to: DeviceNode, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = str(sender.address)
    msg["To"] = str(to.address)
    msg["Subject"] = subject
    msg.set_content(subject)
    return msg.as_bytes()


def inbox_subjects(d: DeviceNode) -> list[str]:
    out = []
    for m in d.filed("INBOX"):
        for line in m.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return out


@pytest.fixture
async def pair(tmp_path: Path):
    clock = FakeClock(int(time.time()))
    dialer = DirectDialer()
    a = InboxNode(tmp_path, "a", clock, dialer)
    b = InboxNode(tmp_path, "b", clock, dialer)
    await a.start(worker=False)
    await b.start(worker=False)
    alice_acc = a.provision("alice")
    bob_acc = b.provision("bob")
    phone_acc = b.add_device(bob_acc, "phone")
    alice = DeviceNode(tmp_path, "alice", alice_acc, clock, dialer)
    bob = DeviceNode(tmp_path, "bob", bob_acc, clock, dialer)
    phone = DeviceNode(tmp_path, "phone", phone_acc, clock, dialer)
    try:
        yield clock, a, b, alice, bob, phone
    finally:
        for d in (alice, bob, phone):
            await d.close()
        await a.stop()
        await b.stop()
        a.close()
        b.close()


async def deliver(a: InboxNode, alice: DeviceNode, bob: DeviceNode, subject: str) -> None:
    report = await alice.device.send(note(alice, bob, subject), [bob.address])
    assert not report.failed, report.failed
    await a.worker.run_due()


async def test_rotation_publishes_new_keys_and_old_mail_still_opens(pair) -> None:
    clock, a, b, alice, bob, phone = pair
    cfg = KeysConfig(device_key_rotation_days=1, prekey_rotation_days=1)
    # alice caches bob's keys, then bob's devices rotate everything (within the mail's lifetime)
    await deliver(a, alice, bob, "before")
    old_spk = bob.device.account.device.current_prekey().spk_id
    clock.advance(2 * DAY)
    changes = await bob.device.maintain_keys(clock.now(), cfg, server_key=None)
    assert any("signing key rotated" in c for c in changes)
    await phone.device.maintain_keys(clock.now(), cfg, server_key=None)
    raw = b.inbox.bundle("bob", clock.now())
    vb = verify_bundle(
        KeyBundle.parse(raw), onion_pk=b.secrets.onion_pk, local="bob", now=clock.now()
    )
    heads = {d.device_id: d for d in vb.devices}
    me = heads[bob.device.account.device.device_id]
    assert me.dsk_seq == 1 and me.spk_id != old_spk
    # mail sealed to the old (cached, retired) prekey still opens on bob's laptop
    await bob.device.sync()
    assert inbox_subjects(bob) == ["before"]
    # and new mail to the fresh bundle works for both devices
    await deliver(a, alice, bob, "after")
    await bob.device.sync()
    await phone.device.sync()
    assert inbox_subjects(bob) == ["before", "after"]
    assert inbox_subjects(phone) == ["before", "after"]
    # bob's keys stay on disk: a restart loads the rotated key
    reloaded = bob.files.load("bob")
    assert reloaded.device.dsk_seq == 1


async def test_retired_prekeys_are_deleted_after_the_retention_period(pair) -> None:
    clock, _, _, _, bob, _ = pair
    cfg = KeysConfig()
    first = bob.device.account.device.current_prekey().spk_id
    clock.advance(8 * DAY)
    await bob.device.maintain_keys(clock.now(), cfg, server_key=None)
    ids = {p.spk_id for p in bob.device.account.device.prekeys}
    assert first in ids  # retired, kept
    clock.advance(61 * DAY)
    await bob.device.maintain_keys(clock.now(), cfg, server_key=None)
    ids = {p.spk_id for p in bob.device.account.device.prekeys}
    assert first not in ids
    assert first not in {p.spk_id for p in bob.files.load("bob").device.prekeys}


async def test_revoked_device_is_refused_at_once_and_its_spool_deleted(pair) -> None:
    clock, a, b, alice, bob, phone = pair
    await deliver(a, alice, bob, "for both")
    assert len(await phone.device.session.pending()) == 1
    revoke_device(bob.device.account, phone.device.account.device.device_id, now=clock.now())
    bob.device.save()
    await bob.device.publish_keys(KeyUpdate(device_list=bob.device.account.device_list))
    with pytest.raises(DeviceRefused):
        await phone.device.session.pending()
    assert (
        b.inbox.store.pending(bob.device.account.mailbox_id, phone.device.account.device.device_id)
        == []
    )
    # a sender with a stale bundle still lists the phone; its copy is dropped by the inbox
    await deliver(a, alice, bob, "after revocation")
    await bob.device.sync()
    assert inbox_subjects(bob) == ["for both", "after revocation"]
    vb = verify_bundle(
        KeyBundle.parse(b.inbox.bundle("bob", clock.now())),
        onion_pk=b.secrets.onion_pk,
        local="bob",
        now=clock.now(),
    )
    assert [d.name for d in vb.devices] == ["laptop"]


async def test_server_key_rotation_moves_the_binding(pair) -> None:
    clock, a, _, alice, _, _ = pair
    from onionpost.device.keylife import rotate_server

    clock.advance(31 * DAY)
    new = rotate_server(a.secrets, clock.now(), KeysConfig(), keep_seconds=60 * DAY)
    assert new is not None
    changes = await alice.device.maintain_keys(clock.now(), KeysConfig(), server_key=new)
    assert any("binding" in c for c in changes)
    vb = verify_bundle(
        KeyBundle.parse(a.inbox.bundle("alice", clock.now() + 61)),
        onion_pk=a.secrets.onion_pk,
        local="alice",
        now=clock.now(),
    )
    assert vb.sek_id == new.sek_id


async def test_mail_sealed_to_keys_that_no_longer_exist_is_sealed_again(pair, tmp_path) -> None:
    """Bob replaces his only device while alice still holds his old keys: her mail is refused
    as stale by bob's inbox, handed back by her outbox, sealed again with fresh keys, and
    reaches bob's new device; no bounce reaches alice."""
    clock, a, b, alice, bob, phone = pair
    await deliver(a, alice, bob, "while the laptop lived")  # alice caches bob's keys
    await bob.device.sync()
    await phone.device.sync()
    revoke_device(bob.device.account, phone.device.account.device.device_id, now=clock.now())
    bob.device.save()
    await bob.device.publish_keys(KeyUpdate(device_list=bob.device.account.device_list))
    # bob's laptop is replaced by a new tablet: a device list without the laptop
    tablet_acc = b.add_device(bob.device.account, "tablet")
    tablet = DeviceNode(tmp_path, "tablet", tablet_acc, clock, alice.device.directory.dialer)
    try:
        old = bob.device.account.device_list
        laptop_id = bob.device.account.device.device_id
        assert bob.device.account.identity is not None
        newer = DeviceList(
            old.uik_pk,
            old.version + 1,
            clock.now(),
            tuple(d for d in old.devices if d.device_id != laptop_id),
            (*old.revoked, RevokedDevice(laptop_id, clock.now())),
        ).signed(bob.device.account.identity.uik_seed)
        b.inbox.publish(bob.device.account.mailbox_id, KeyUpdate(device_list=newer), clock.now())

        # alice sends with her cached (now stale) view of bob: only the laptop, now revoked
        alice.submissions.submit("alice", [bob.address], note(alice, bob, "to the new tablet"))
        await alice.submissions.process_due()
        await a.worker.run_due()
        rows = a.inbox.outbox.rows(states=("reseal",))  # handed back, not an outcome
        assert rows and rows[-1].last_error_code == "5.7.5", rows
        assert not a.inbox.outbox.rows(states=("bounced",))
        await alice.submissions.check_outbox(alice.device)  # re-seal with fresh keys
        await alice.submissions.process_due()
        await a.worker.run_due()
        assert a.inbox.outbox.rows() == []
        assert not a.inbox.outbox.rows(states=("bounced", "reseal"))
        await tablet.device.sync()
        assert inbox_subjects(tablet) == ["to the new tablet"]
        await alice.submissions.check_outbox(alice.device)
        assert inbox_subjects(alice) == []  # no bounce, no delay notice
    finally:
        await tablet.close()
