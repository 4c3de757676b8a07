"""Sealing a large message leaves the event loop free (issue 12: "one slow message never
delays the others"): from ``SEAL_IN_POOL_FROM`` on, both sealing steps run in the crypto
pool, smaller messages are sealed on the loop (in a thread their Python would fight the loop
for the GIL), and either way the message arrives byte for byte."""

from __future__ import annotations

import threading
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from onionpost.core.crypto import envelope
from onionpost.device.sending import SEAL_IN_POOL_FROM
from onionpost.testing.harness import AliceAndBob, DeviceNode, compose


class World(AliceAndBob):
    pass


def large(sender: DeviceNode, to: DeviceNode, size: int) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = str(sender.address), str(to.address), "large"
    msg["Message-ID"] = "<large@test>"
    msg.set_content("line of a large message\n" * (size // 25))
    return msg.as_bytes()


async def test_a_large_message_is_sealed_off_the_loop_and_arrives_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, list[int]] = {"seal_inner": [], "seal_outer": [], "l2_digest": []}

    def watched(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            threads[name].append(threading.get_ident())
            return real(*args, **kwargs)

        return call

    for name in threads:
        monkeypatch.setattr(envelope, name, watched(name, getattr(envelope, name)))
    loop_thread = threading.get_ident()
    async with World(tmp_path) as w:
        small = compose(w.alice, w.bob, "small")
        big = large(w.alice, w.bob, 2 * SEAL_IN_POOL_FROM)
        for message in (small, big):
            w.alice.submissions.submit(w.alice.user, [w.bob.address], message)
            await w.alice.submissions.process_due()
        await w.a.worker.run_due()
        assert await w.bob.device.sync() == 2
        filed = w.bob.filed()
    # The first message sealed on the loop, the large one in the pool: inner and outer.
    assert threads["seal_inner"][0] == loop_thread == threads["seal_outer"][0]
    assert threads["seal_inner"][1] != loop_thread != threads["seal_outer"][1]
    # bob is a stranger to alice: each message carries a proof of work, bound to the L2's
    # digest, which sealing left out and the sender took from the sealed L2 (the large one's
    # in the pool too).
    assert threads["l2_digest"][0] == loop_thread != threads["l2_digest"][1]
    assert len(filed) == 2
    head, body = filed[1].split(b"\r\n\r\n", 1)
    sent_head, sent_body = big.replace(b"\n", b"\r\n").split(b"\r\n\r\n", 1)
    assert body == sent_body and len(body) > 2 * SEAL_IN_POOL_FROM - 100
    assert head.endswith(sent_head)  # after the receiving device's own header lines
