"""alice introduces bob to carol, three complete nodes over the private Tor network.

bob's mailbox is contacts-only: carol's mail is refused before the introduction, gets
through after bob accepted it (bob's node compares carol's key with her onion's on
acceptance), and no proof of work is paid for it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.device.introductions import accept, introduce
from onionpost.store.introductions import IntroductionStore
from onionpost.testing.mailstore import subjects
from onionpost.testing.tornet import TorNetwork
from tests.tor.nodes import eventually, running, send

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_an_introduction_opens_a_contacts_only_mailbox_over_tor(
    tor_network: TorNetwork, tmp_path: Path
) -> None:
    async with running(tmp_path, tor_network, "alice", "bob", "carol") as nodes:
        alice, bob, carol = nodes["alice"], nodes["bob"], nodes["carol"]
        # alice knows both (mail both ways with each); bob and carol do not know each other
        for a, b in (("alice", "bob"), ("alice", "carol")):
            await send(nodes[a], a, nodes[b], b, f"hello {b}")
            await eventually(lambda b=b: f"hello {b}" in subjects(nodes[b], b), f"mail at {b}")
            await send(nodes[b], b, nodes[a], a, f"hello {a} from {b}")
            await eventually(
                lambda a=a, b=b: f"hello {a} from {b}" in subjects(nodes[a], a), f"{b}'s reply"
            )
        bob_dev, carol_dev = bob.devices["bob"], carol.devices["carol"]
        assert bob.inbox is not None
        bob.inbox.set_accepts_strangers(bob_dev.account.mailbox_id, False)

        # carol is a stranger to bob: refused before anything is sent
        await send(carol, "carol", bob, "bob", "too early")
        assert carol.submissions is not None
        listing = carol.submissions.store.listing

        def refused() -> bool:
            return any("contacts only" in (p.last_error or "") for p in listing("carol"))

        await eventually(refused, "carol's mail refused as a stranger's")
        for p in listing("carol"):
            carol.submissions.store.cancel(p.submission_id)

        # alice introduces them; each gets the notice mail
        alice_dev = alice.devices["alice"]
        assert alice.device_db is not None
        introduce(
            alice.device_db,
            contacts=alice_dev.contacts,
            me=alice_dev.address,
            uik_pk=alice_dev.account.uik_pk,
            dsk_seed=alice_dev.account.device.dsk_seed,
            b=str(bob_dev.address),
            c=str(carol_dev.address),
            now=int(time.time()),
        )
        alice.wake()
        wanted = f"alice introduces you to {carol_dev.address}"
        await eventually(lambda: wanted in subjects(bob, "bob"), "the introduction at bob")
        await eventually(
            lambda: f"alice introduces you to {bob_dev.address}" in subjects(carol, "carol"),
            "the introduction at carol",
        )

        # bob accepts; his node fetches carol's keys over tor and compares
        assert bob.device_db is not None
        now = int(time.time())

        async def fetch(who):  # type: ignore[no-untyped-def]
            return await bob_dev.directory.identity_now(who, now=now)

        accepted = await accept(
            contacts=bob_dev.contacts,
            introductions=IntroductionStore(bob.device_db, "bob"),
            address=str(carol_dev.address),
            register=bob_dev.session.register_token,
            fetch_uik=fetch,
            now=now,
        )
        assert accepted.checked_now
        assert fingerprint(accepted.introduction.uik_pk) == fingerprint(carol_dev.account.uik_pk)

        # carol writes: through bob's contacts-only mailbox, without a proof of work
        await send(carol, "carol", bob, "bob", "hello bob, alice sent me")
        await eventually(
            lambda: "hello bob, alice sent me" in subjects(bob, "bob"), "carol's mail at bob"
        )
        strangers = bob.inbox.store.db.scalar(
            "SELECT coalesce(sum(count), 0) FROM rate_counters WHERE scope = 'strangers'"
        )
        # alice's first mail to bob was a stranger's (one stamp); carol's was not
        assert strangers == 1
