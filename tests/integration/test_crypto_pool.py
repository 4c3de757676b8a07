"""The crypto pool is the node's to size (``delivery.crypto_workers``): a device opens the
envelopes it fetches in the pool it is given, and mail arrives exactly as with the shared
one, with one worker as with several.

Two inboxes on loopback (alice's A, bob's B), as in ``test_delivery_batching.py``; bob's
device takes a burst in one sync through a pool that counts what it was given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import pytest

from onionpost.base.clock import FakeClock
from onionpost.base.config import load
from onionpost.device.sync import Receiver
from onionpost.net.transport import DirectDialer
from onionpost.testing.harness import DeviceNode, InboxNode


class CountingPool(ThreadPoolExecutor):
    """A real pool that counts the jobs it ran (the receiver's envelope openings)."""

    def __init__(self, workers: int) -> None:
        super().__init__(max_workers=workers, thread_name_prefix="test-crypto")
        self.jobs = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


def compose(sender: DeviceNode, to: DeviceNode, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = str(sender.address)
    msg["To"] = str(to.address)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    msg.set_content(f"body of {subject}")
    return msg.as_bytes()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_device_opens_its_mail_in_the_pool_it_is_given(
    tmp_path: Path, workers: int
) -> None:
    clock = FakeClock(int(time.time()))
    dialer = DirectDialer()
    a = InboxNode(tmp_path, "inbox-a", clock, dialer)
    b = InboxNode(tmp_path, "inbox-b", clock, dialer)
    alice = DeviceNode(tmp_path, "alice", a.provision("alice"), clock, dialer)
    bob = DeviceNode(tmp_path, "bob", b.provision("bob"), clock, dialer)
    pool = CountingPool(workers)
    old = bob.device.receiver
    bob.device.receiver = Receiver(
        account=old.account,
        session=old.session,
        filer=old.filer,
        contacts=old.contacts,
        now=clock.now,
        max_bytes=old.max_bytes,
        crypto_pool=pool,
    )
    await a.start(worker=False)
    await b.start(worker=False)
    try:
        for i in range(6):
            alice.submissions.submit(alice.user, [bob.address], compose(alice, bob, f"mail {i}"))
            await alice.submissions.process_due()
            await a.worker.run_due()
        assert await bob.device.sync() == 6
        assert pool.jobs == 6  # every envelope was opened in the given pool
        subjects = sorted(
            str(message_from_bytes(m, policy=default)["Subject"]) for m in bob.filed("INBOX")
        )
        assert subjects == [f"mail {i}" for i in range(6)]
        assert await bob.device.sync() == 0  # nothing twice
    finally:
        pool.shutdown()
        await alice.close()
        await bob.close()
        await a.stop()
        await b.stop()
        a.close()
        b.close()


def test_the_pool_size_is_read_from_the_configuration(tmp_path: Path) -> None:
    (tmp_path / "onionpost.toml").write_text("[delivery]\ncrypto_workers = 1\n")
    assert load(tmp_path).delivery.crypto_workers == 1
    assert load(tmp_path / "other").delivery.crypto_workers == 0  # default: one per CPU
