"""Sent holds each message once, whatever the mail client does (a whole node, Dovecot).

* A client that saves its own copy (Thunderbird's Fcc, mutt's ``record``) APPENDs it right
  after sending: Sent keeps exactly that copy, byte for byte, and the node files none.
* A client that does not: the node files its copy once ``sent_copy_wait_seconds`` is over.
* ``onionpost send`` has no client: its copy is filed at once, without the wait.
"""

from __future__ import annotations

import imaplib
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import make_msgid

from onionpost.core.address import Address
from onionpost.core.crypto.primitives import SeededRandom, ed25519_public

from .test_imap_flood import RunningNode, running_node

BOB = Address.for_key("bob", ed25519_public(SeededRandom(b"bob of nowhere")(32)))

WAIT = 20  # the node's sent_copy_wait_seconds here


def sent_with(node: RunningNode, imap: imaplib.IMAP4, subject: str) -> list[bytes]:
    imap.select("Sent", readonly=True)
    _, found = imap.search(None, "SUBJECT", f'"{subject}"')
    copies = []
    for num in found[0].split():
        _, data = imap.fetch(num, "(BODY.PEEK[])")
        item = data[0]
        assert isinstance(item, tuple)
        copies.append(item[1])
    return copies


def until(check, what: str, timeout: float = 300) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def message(node: RunningNode, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = node.address
    msg["To"] = str(BOB)  # an inbox nobody runs: only Sent matters here
    msg["Subject"] = subject
    msg["Message-ID"] = make_msgid(domain="sent.test")
    msg.set_content(f"{subject}\n")
    return msg


def test_sent_holds_each_message_once_whatever_the_client_does() -> None:
    with running_node(extra=f"sent_copy_wait_seconds = {WAIT}") as node:
        imap = node.imap()
        try:
            with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=60) as smtp:
                smtp.starttls(context=ssl.create_default_context(cafile=node.ca_file))
                smtp.login("alice", node.password)
                # (b) no copy of its own; (a) then a copy of its own, appended at once
                smtp.send_message(message(node, "client keeps no copy"))
                own = message(node, "client keeps its own copy")
                smtp.send_message(own)
            own_bytes = own.as_bytes().replace(b"\n", b"\r\n")
            typ, _ = imap.append("Sent", "(\\Seen)", None, own_bytes)
            assert typ == "OK"

            # (c) `onionpost send`: filed at once, while (b)'s copy still waits out WAIT
            node.cli(
                "send",
                "--to",
                node.address,
                "--subject",
                "sent from the shell",
                "--text",
                "no client here",
            )
            until(lambda: len(sent_with(node, imap, "sent from the shell")) == 1, "(c)")
            assert sent_with(node, imap, "client keeps no copy") == []

            # (b) the node's copy comes after the wait; (a) the client's copy is the only one
            until(lambda: len(sent_with(node, imap, "client keeps no copy")) == 1, "(b)")
            until(
                lambda: "the client saved its own copy" in node.log_path.read_text(),
                "the node to see the client's copy",
            )
            assert sent_with(node, imap, "client keeps its own copy") == [own_bytes]
            imap.select("Sent", readonly=True)
            _, unseen = imap.search(None, "UNSEEN")
            assert unseen[0].split() == []  # the node's copies are marked \\Seen too
        finally:
            imap.logout()
