"""Introductions between contacts (``onionpost contacts introduce B C``), device side.

*Sending* (A): :func:`introduce` checks that B and C are A's contacts, draws two fresh
tokens, signs one record for each (:mod:`onionpost.core.crypto.introduction`) and queues each as a
submission of its own (content type 2), so it is sealed, retried and bounced like mail.

*Receiving* (B): the receiver (:mod:`onionpost.device.sync`) checks every signature, drops an
introduction whose sender is not one of B's contacts, records the rest and files the notice
mail :func:`notice` builds.

*Accepting* (B): :func:`accept` pins C's introduced identity key (refusing loudly when C's
inbox, if it can be reached, presents another one, or when B already pinned another one),
registers the introduction's admit token at B's own inbox (so C's mail passes a
contacts-only mailbox without proof of work) and records it as the token B gave C (so
blocking C withdraws it).

Why the tokens work this way: a contact token is valid at one inbox only if one of that
mailbox's own devices registered it there.  The introducer cannot do that for anyone, so it
only *draws* the token and hands it to both sides; B's acceptance makes it valid at B's
inbox, and C presents it.  Until B accepts, C's token opens nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate

from onionpost.core.address import Address
from onionpost.core.crypto.bundle import Pin
from onionpost.core.crypto.envelope import CONTENT_INTRODUCTION
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.crypto.introduction import Introduction, introduction_pair
from onionpost.core.crypto.primitives import RandomSource, system_random
from onionpost.core.crypto.sender import pin_encode
from onionpost.core.errors import IntroductionMismatch, UsageError
from onionpost.store.contacts import Contact, ContactStore
from onionpost.store.db import Database
from onionpost.store.introductions import IntroductionStore, StoredIntroduction
from onionpost.store.submissions import SubmissionStore

#: How long an introduction can be accepted (and is retried while undelivered).
INTRODUCTION_LIFETIME = 14 * 86_400


def identity_pin(uik_pk: bytes) -> Pin:
    """A pin of the identity key alone (no device list seen yet): what accepting an
    introduction records before the person's bundle was fetched.  The first bundle or
    message must carry this identity key; their device list is then pinned on top."""
    return Pin(uik_pk, 0, bytes(32), {})


def is_contact(contact: Contact | None) -> bool:
    """Whom an introduction is accepted from: someone we wrote to (so holding a token for
    our mailbox, which is what "contact" means for a contacts-only mailbox) and did not
    block.  Someone who merely wrote to us, as a stranger, is not."""
    return contact is not None and not contact.blocked and contact.token_from_them is not None


def _person(store: ContactStore, text: str, me: Address) -> tuple[Address, Contact]:
    address = Address.parse(text)
    if address == me:
        raise UsageError("You cannot introduce yourself; introduce two of your contacts.")
    contact = store.get(str(address))
    if contact is None:
        raise UsageError(
            f"{address} is not among your contacts: you can only introduce people whose "
            "keys you have (write to them first)."
        )
    if contact.blocked:
        raise UsageError(f"{address} is blocked; you cannot introduce them.")
    return address, contact


@dataclass(frozen=True)
class Queued:
    """The submissions that carry the two introductions."""

    to_b: int
    to_c: int


def introduce(
    db: Database,
    *,
    contacts: ContactStore,
    me: Address,
    uik_pk: bytes,
    dsk_seed: bytes,
    b: str,
    c: str,
    now: int,
    rng: RandomSource = system_random,
) -> Queued:
    """Queue ``me introduces b to c`` (both directions); durable on return."""
    b_addr, b_contact = _person(contacts, b, me)
    c_addr, c_contact = _person(contacts, c, me)
    if b_addr == c_addr:
        raise UsageError("Introduce two different people.")
    for_b, for_c = introduction_pair(
        introducer_uik=uik_pk,
        b=(b_addr.local, b_addr.onion_public_key, b_contact.uik_pk),
        c=(c_addr.local, c_addr.onion_public_key, c_contact.uik_pk),
        token_b=rng(32),
        token_c=rng(32),
        created_at=now,
        expires_at=now + INTRODUCTION_LIFETIME,
        dsk_seed=dsk_seed,
    )
    store = SubmissionStore(db)
    with db.transaction():
        sid_b = _queue(store, me, b_addr, c_addr, rec=for_b, now=now)
        sid_c = _queue(store, me, c_addr, b_addr, rec=for_c, now=now)
    return Queued(sid_b, sid_c)


def _queue(
    store: SubmissionStore, me: Address, to: Address, about: Address, *, rec: Introduction, now: int
) -> int:
    # Made-up headers: a bounce or delay notice quotes them to say what could not be sent.
    headers = (f"From: {me}\r\nTo: {to}\r\nSubject: Introduction of {about} to {to}\r\n").encode(
        "ascii"
    )
    return store.add(
        user=me.local,
        message=rec.encode(),
        headers=headers,
        recipients=[str(to)],
        message_ref="",
        now=now,
        expires_at=rec.expires_at,
        content_type=CONTENT_INTRODUCTION,
    )


def notice(
    *,
    me: Address,
    introducer: Address,
    introduced: Address,
    intro: Introduction,
    pinned: bytes | None,
    msg_id: bytes,
    now: int,
) -> bytes:
    """The mail the recipient sees for a verified introduction from a contact.  Every
    name in it was checked: addresses are valid onion addresses, keys were verified."""
    fp = fingerprint(intro.uik_pk)
    command = f"onionpost contacts accept-intro {introduced} --user {me.local}"
    if pinned is not None and pinned != intro.uik_pk:
        advice = (
            "WARNING: you already have a DIFFERENT identity key pinned for "
            f"{introduced} (fingerprint {fingerprint(pinned)}). Either {introducer} is "
            "mistaken or someone is impersonating one of them. Do not accept before you "
            "compared fingerprints with both over another channel; accepting is refused "
            "while the keys differ.\r\n"
        )
    else:
        advice = (
            f"To accept {introduced} as a contact, run:\r\n\r\n    {command}\r\n\r\n"
            f"This pins the identity key above for {introduced} (a different key presented "
            "later is refused loudly) and lets them write to you without a proof of work, "
            "also when you accept mail from contacts only. If you do nothing, nothing "
            "changes: they remain a stranger to you.\r\n"
        )
    text = (
        f"{introducer} introduces you to {introduced}.\r\n\r\n"
        f"Identity fingerprint of {introduced}, as {introducer} knows it:\r\n\r\n"
        f"    {fp}\r\n\r\n" + advice
    )
    return (
        f"From: onionpost <postmaster@{me.domain}>\r\n"
        f"To: {me}\r\n"
        f"Subject: {introducer.local} introduces you to {introduced}\r\n"
        f"Date: {formatdate(now, usegmt=True)}\r\n"
        f"Message-ID: <introduction.{msg_id.hex()}@{me.domain}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "X-Onionpost-Notice: introduction\r\n"
        f"X-Onionpost-Introduced: {introduced} (identity {fp})\r\n"
        f"X-Onionpost-Introducer: {introducer}\r\n"
        "\r\n" + text
    ).encode("utf-8")


def block(contacts: ContactStore, address: str) -> tuple[bool, list[bytes]]:
    """Mark a contact blocked; returns whether they were a contact, and every token to
    withdraw at our inbox for them: the one we gave them and those registered by
    introductions of them we accepted (they present one of those until we write to them)."""
    found, token = contacts.block(address)
    tokens = [token] if token is not None else []
    for t in IntroductionStore(contacts.db, contacts.user).admitted_tokens(address):
        if t not in tokens:
            tokens.append(t)
    return found, tokens


@dataclass(frozen=True)
class Accepted:
    introduction: StoredIntroduction
    #: The identity key was compared with the one the person's inbox serves now (else it is
    #: compared on the first fetch).
    checked_now: bool
    new_contact: bool


async def accept(
    *,
    contacts: ContactStore,
    introductions: IntroductionStore,
    address: str,
    register: Callable[[bytes, str], Awaitable[object]],
    fetch_uik: Callable[[Address], Awaitable[bytes | None]] | None,
    now: int,
) -> Accepted:
    """Accept the pending introduction of ``address`` (see the module docstring).

    ``register(token, label)`` registers a token at our inbox; ``fetch_uik`` returns the
    identity key the person's inbox serves now, or None when it cannot be reached.  Raises
    :class:`IntroductionMismatch`, and changes nothing, when keys disagree.
    """
    who = Address.parse(address)
    key = str(who)
    pending = introductions.pending(key, now)
    if not pending:
        raise UsageError(
            f"No introduction of {key} is waiting for you (it may have expired or been "
            "accepted already; `onionpost contacts` lists your contacts)."
        )
    if len({p.uik_pk for p in pending}) > 1:
        raise IntroductionMismatch(
            f"Your introducers disagree about {key}'s identity key ("
            + ", ".join(f"{p.introducer}: {fingerprint(p.uik_pk)}" for p in pending)
            + "). Nothing was accepted: compare fingerprints with them over another channel."
        )
    intro = pending[0]
    contact = contacts.get(key)
    if contact is not None and contact.uik_pk != intro.uik_pk:
        raise IntroductionMismatch(
            f"REFUSED: {intro.introducer} vouches for identity key {fingerprint(intro.uik_pk)} "
            f"for {key}, but you have {fingerprint(contact.uik_pk)} pinned. Nothing was "
            "accepted: compare fingerprints with both of them over another channel."
        )
    if contact is not None and contact.blocked:
        raise UsageError(f"{key} is blocked; unblock them first if you want to accept them.")
    fetched = await fetch_uik(who) if fetch_uik is not None else None
    if fetched is not None and fetched != intro.uik_pk:
        raise IntroductionMismatch(
            f"REFUSED: {key}'s inbox presents identity key {fingerprint(fetched)}, but "
            f"{intro.introducer} introduced them with {fingerprint(intro.uik_pk)}. Someone "
            "may be impersonating them, or the introducer is mistaken. Nothing was pinned "
            "and they were not let in: compare fingerprints over another channel."
        )
    if contact is None:
        contacts.remember(
            key, uik_pk=intro.uik_pk, pin=pin_encode(identity_pin(intro.uik_pk)), now=now
        )
    await register(intro.admit_token, key)
    if contact is None or contact.token_from_them is None:
        contacts.set_token_from_them(key, intro.admit_token)
    introductions.mark_accepted(intro.id, now)
    return Accepted(intro, fetched is not None, contact is None)
