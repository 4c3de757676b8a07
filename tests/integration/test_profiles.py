"""Profiles end to end: signed, published, verified on fetch and on receipt, shown in From.

Two inboxes on loopback.  The first test drives devices directly (fast, the mailbox in
memory); the second runs a whole node (``onionpost run``, tor off, Dovecot) as bob, uses the
CLI (``profile set``, ``contacts``) and reads what alice's mail looks like over IMAP, as
Thunderbird would.
"""

from __future__ import annotations

import asyncio
import imaplib
import io
import json
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from pathlib import Path

import pytest
from PIL import Image

from onionpost.base.clock import FakeClock
from onionpost.core.account import sign_profile
from onionpost.core.crypto.bundle import KeyBundle
from onionpost.core.crypto.keys import Profile
from onionpost.core.errors import OnionpostError
from onionpost.core.wire import KeyUpdate
from onionpost.net.transport import DirectDialer
from onionpost.testing.harness import AliceAndBob, DeviceNode, InboxNode

from .test_enrolment import (
    acli,
    pi,  # noqa: F401 (a fixture: an inbox-only node, tor off)
    tor_off,
    write_config,
)
from .test_imap_flood import RunningNode, dovecot_or_skip


def compose(sender: DeviceNode, to: str, subject: str, display: str = "") -> bytes:
    msg = EmailMessage()
    msg["From"] = f"{display} <{sender.address}>" if display else str(sender.address)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '.')}@test>"
    msg.set_content(f"body of {subject}")
    return msg.as_bytes()


async def set_profile(d: DeviceNode, name: str, avatar: bytes = b"") -> Profile:
    """What ``onionpost profile set`` does on a device holding the identity key: sign,
    publish to the inbox over the device session, carry the card in sent mail."""
    account = d.device.account
    profile, card = sign_profile(
        account,
        display_name=name,
        avatar_type="image/png" if avatar else "",
        avatar=avatar,
        now=d.device.clock.now(),
        previous=account.profile,
    )
    await d.device.session.publish(KeyUpdate(profile=profile))
    assert d.device.adopt_profile(profile, card)
    return profile


def froms(d: DeviceNode) -> list[tuple[str, str | None]]:
    out = []
    for raw in d.filed():
        msg = message_from_bytes(raw, policy=default)
        out.append((str(msg["From"]), msg["X-Onionpost-Verified-Name"]))
    return out


class World(AliceAndBob):
    async def send(
        self, sender: DeviceNode, to: DeviceNode, subject: str, display: str = ""
    ) -> None:
        sender.submissions.submit(
            sender.user, [to.address], compose(sender, str(to.address), subject, display)
        )
        await sender.submissions.process_due()
        await self.inbox_of(sender).worker.run_due()
        await to.device.sync()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with World(tmp_path) as w:
        yield w


async def test_a_profile_is_verified_on_receipt_and_on_fetch(world: World, caplog) -> None:  # type: ignore[no-untyped-def]
    w = world
    alice, bob = str(w.alice.address), str(w.bob.address)

    # before any profile: From is what alice wrote, nothing is claimed for her
    await w.send(w.alice, w.bob, "no profile yet", display="Alice")
    assert froms(w.bob)[-1] == (f"Alice <{alice}>", None)

    # alice publishes a profile: her inbox serves it, and her mail carries its card
    await set_profile(w.alice, "Alice Liddell")
    served = KeyBundle.parse(w.a.inbox.bundle("alice", w.clock.now())).profile
    assert served is not None and served.display_name == "Alice Liddell"
    await w.send(w.alice, w.bob, "with a profile")
    assert froms(w.bob)[-1] == (f"Alice Liddell <{alice}>", "Alice Liddell")
    assert w.bob.contacts.get(alice).display_name == "Alice Liddell"  # type: ignore[union-attr]

    # a display name that is not the verified one is marked, the verified one first
    await w.send(w.alice, w.bob, "claiming", display="Your Bank")
    assert froms(w.bob)[-1] == (
        f'"Alice Liddell (unverified: Your Bank)" <{alice}>',
        "Alice Liddell",
    )

    # bob's profile reaches alice through his bundle, fetched when she writes to him
    await set_profile(w.bob, "Bob Builder")
    w.alice.device.directory.forget(w.bob.address)  # as after the minute it reuses keys
    await w.send(w.alice, w.bob, "fetches bob's keys")
    assert w.alice.contacts.get(bob).display_name == "Bob Builder"  # type: ignore[union-attr]

    # bob's inbox serves a profile signed by someone else: ignored, with a warning
    mallory = w.b.provision("mallory")
    assert mallory.identity is not None
    forged = Profile(mallory.uik_pk, w.clock.now() + 10, "Your Bank").signed(
        mallory.identity.uik_seed
    )
    w.b.inbox.store.set_profile(w.bob.device.account.mailbox_id, forged.encode())
    w.b.inbox._bundle_cache.clear()
    w.alice.device.directory.forget(w.bob.address)
    with caplog.at_level("WARNING"):
        await w.send(w.alice, w.bob, "after the forgery")
    assert "ignored" in caplog.text and "different identity" in caplog.text
    assert w.alice.contacts.get(bob).display_name == "Bob Builder"  # type: ignore[union-attr]
    assert froms(w.bob)[-1][0] == f"Alice Liddell <{alice}>"  # the mail itself went through

    # the inbox refuses a profile older than the one it serves
    older = Profile(w.alice.device.account.uik_pk, 1, "Old").signed(
        w.alice.device.account.identity.uik_seed  # type: ignore[union-attr]
    )
    with pytest.raises(OnionpostError, match="newer profile"):
        await w.alice.device.session.publish(KeyUpdate(profile=older))

    # alice clears her profile: an empty signed profile, newer, so bob forgets the name
    await set_profile_cleared(w.alice)
    await w.send(w.alice, w.bob, "after clearing", display="Alice")
    assert froms(w.bob)[-1] == (f"Alice <{alice}>", None)
    assert w.bob.contacts.get(alice).display_name == ""  # type: ignore[union-attr]


async def set_profile_cleared(d: DeviceNode) -> None:
    account = d.device.account
    profile, card = sign_profile(
        account,
        display_name="",
        avatar_type="",
        avatar=b"",
        now=d.device.clock.now(),
        previous=account.profile,
    )
    await d.device.session.publish(KeyUpdate(profile=profile))
    assert d.device.adopt_profile(profile, card)


# -- a whole node: the CLI, Dovecot, IMAP ----------------------------------------------------


def inbox_headers(imap: imaplib.IMAP4) -> dict[str, tuple[str, str | None]]:
    """Subject -> (From, X-Onionpost-Verified-Name) of every message in INBOX, over IMAP."""
    imap.select("INBOX", readonly=True)
    _, found = imap.search(None, "ALL")
    out = {}
    for num in found[0].split():
        _, data = imap.fetch(num, "(BODY.PEEK[HEADER])")
        item = data[0]
        assert isinstance(item, tuple)
        msg = message_from_bytes(item[1], policy=default)
        out[str(msg["Subject"])] = (str(msg["From"]), msg["X-Onionpost-Verified-Name"])
    return out


@pytest.mark.slow
async def test_alices_verified_name_shows_in_bobs_mail_client(tmp_path: Path) -> None:
    dovecot_or_skip()
    base = Path(tempfile.mkdtemp(prefix="opprofile-", dir="/tmp"))
    base.chmod(0o755)  # as root, Dovecot's mail account must pass through
    node = RunningNode(base, user="bob")
    clock = FakeClock(int(time.time()))
    dialer = DirectDialer()
    a = InboxNode(tmp_path, "inbox-a", clock, dialer)
    alice = DeviceNode(tmp_path, "alice", a.provision("alice"), clock, dialer)
    try:
        # bob sets his profile with the CLI (a picture with metadata that must not survive)
        picture = io.BytesIO()
        Image.new("RGB", (900, 600), (200, 40, 40)).save(picture, "JPEG", comment=b"secret")
        (base / "me.jpg").write_bytes(picture.getvalue())
        out = node.cli("profile", "set", "--name", "Bob Builder", "--avatar", str(base / "me.jpg"))
        assert "name:    Bob Builder" in out and "image/jpeg" in out, out
        (base / "not-a-picture.png").write_text("<html>hello</html>")
        refused = node.cli_fails("profile", "set", "--avatar", str(base / "not-a-picture.png"))
        assert "PNG or JPEG" in refused
        node.start()
        await a.start(worker=False)
        dialer.add(_addr(node.address).onion, "127.0.0.1", node.api_port)

        await set_profile(alice, "Alice Liddell")
        for subject, display in (("hello bob", ""), ("pay now", "Your Bank")):
            alice.submissions.submit(
                alice.user, [_addr(node.address)], compose(alice, node.address, subject, display)
            )
        await alice.submissions.process_due()
        await a.worker.run_due()
        assert [r.state for r in a.inbox.outbox.rows(states=("delivered",))] == [
            "delivered",
            "delivered",
        ], a.inbox.outbox.rows()

        # alice's device verified bob's profile when it fetched his keys from his node
        assert alice.contacts.get(node.address).display_name == "Bob Builder"  # type: ignore[union-attr]

        imap = node.imap()
        try:
            deadline = time.monotonic() + 120
            while len(seen := inbox_headers(imap)) < 2:
                assert time.monotonic() < deadline, node.log_path.read_text()
                await asyncio.sleep(0.25)
        finally:
            imap.logout()
        me = str(alice.address)
        assert seen["hello bob"] == (f"Alice Liddell <{me}>", "Alice Liddell")
        assert seen["pay now"] == (
            f'"Alice Liddell (unverified: Your Bank)" <{me}>',
            "Alice Liddell",
        )
        assert f"{me} (Alice Liddell)" in node.cli("contacts")
        shown = node.cli("contacts", "show", me)
        assert "name:           Alice Liddell (from their signed profile)" in shown
        assert "name:    Bob Builder" in node.cli("profile", "show")
    finally:
        node.stop()
        await alice.close()
        await a.stop()
        a.close()
        shutil.rmtree(base, ignore_errors=True)


def _addr(text: str):  # type: ignore[no-untyped-def]
    from onionpost.core.address import Address

    return Address.parse(text)


# -- a laptop whose inbox is a Pi: the profile goes over the network --------------------------


async def test_a_laptop_publishes_its_profile_to_its_pi(pi, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    p, onion = pi
    code, out = await acli(p.config.data_dir, "users", "invite", "alice", "--json")
    assert code == 0, out
    l_home = tmp_path / "laptop"
    write_config(l_home, tor_off({onion: p.api_port}))
    code, out = await acli(
        l_home, "init", "--invite", json.loads(out)["code"], "--device-name", "laptop"
    )
    assert code == 0, out

    def served() -> Profile | None:
        return KeyBundle.parse(p.inbox.bundle("alice", int(time.time()))).profile

    picture = tmp_path / "me.png"
    buf = io.BytesIO()
    Image.new("RGBA", (640, 480), (10, 200, 30, 128)).save(buf, "PNG")
    picture.write_bytes(buf.getvalue())
    code, out = await acli(
        l_home, "profile", "set", "--name", "Alice Liddell", "--avatar", str(picture)
    )
    assert code == 0, out
    first = served()
    assert first is not None and first.display_name == "Alice Liddell"
    assert first.avatar_type == "image/png"
    assert Image.open(io.BytesIO(first.avatar)).size == (256, 192)

    # a new name keeps the published avatar; --no-avatar drops it
    code, out = await acli(l_home, "profile", "set", "--name", "Alice L.")
    assert code == 0, out
    second = served()
    assert second is not None and second.avatar == first.avatar
    assert second.display_name == "Alice L." and second.issued_at > first.issued_at
    code, out = await acli(l_home, "profile", "set", "--no-avatar")
    assert code == 0, out
    assert served().avatar == b""  # type: ignore[union-attr]

    # refusals are sentences, and nothing is published
    (tmp_path / "note.png").write_bytes(b"not a picture at all")
    for args, words in (
        (("--avatar", str(tmp_path / "note.png")), "PNG or JPEG"),
        (("--name", "two\nlines"), "one line"),
        ((), "Give --name"),
    ):
        code, out = await acli(l_home, "profile", "set", *args)
        assert code != 0 and words in out and "Traceback" not in out, out
    assert served().display_name == "Alice L."  # type: ignore[union-attr]

    code, out = await acli(l_home, "profile", "clear")
    assert code == 0, out
    cleared = served()
    assert cleared is not None and cleared.display_name == "" and cleared.avatar == b""
    code, out = await acli(l_home, "profile")
    assert code == 0 and "You have no profile" in out, out
