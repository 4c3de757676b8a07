"""Introductions (``A introduces B to C``): the signed record one contact sends another.

The introducer A sends B a record naming C (address and identity key) and C a record naming
B.  Each record also carries two fresh contact tokens that A drew for this pair: the
*admit* token, which the recipient registers at its own inbox when it accepts (the other
person presents it there), and the *present* token, which the recipient presents at the
other person's inbox (valid once the other person accepted).  A cannot make a token valid at
anyone's inbox (only a mailbox's own devices can register tokens there), so nothing here
lets anyone in by itself: each side's acceptance opens that side's door.  See
``docs/protocol.md`` §16 for the format and why.

The record is signed by the introducer's device signing key (DSK) and travels as the body of
an L3 message of content type :data:`~onionpost.core.crypto.envelope.CONTENT_INTRODUCTION`, whose
sender credentials prove that DSK belongs to the introducer's identity key.  The record also
names the introducer's and the recipient's identity keys, so it cannot be replayed to
someone else or passed off as someone else's introduction.

Pure: encoding, parsing (every length bounded) and signatures; no I/O and no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.primitives import ed25519_sign, ed25519_verify
from onionpost.core.errors import MalformedData, MessageExpired

MAGIC = b"OPin"
CTX_INTRODUCTION = b"onionpost/v1/introduction\x00"
TOKEN_BYTES = 32
MAX_LOCAL_BYTES = 64
#: The longest an introduction stays acceptable (the same bound as a message's lifetime).
MAX_LIFETIME = 30 * 86_400
#: A record is at most this long (fixed fields plus the longest local part).
MAX_BYTES = 4 + 32 + 32 + 1 + MAX_LOCAL_BYTES + 32 + 32 + 32 + 32 + 8 + 8 + 64


@dataclass(frozen=True)
class Introduction:
    """One introduction, as the recipient receives it."""

    #: The introducer's identity key (UIK); must be the L3 sender's.
    introducer_uik: bytes
    #: Who this record is for: the recipient's identity key.
    recipient_uik: bytes
    #: The person introduced: ``local@<onion of onion_pk>`` and their identity key.
    local: str
    onion_pk: bytes
    uik_pk: bytes
    #: Registered at the recipient's own inbox on acceptance; the introduced person presents it.
    admit_token: bytes
    #: Presented by the recipient at the introduced person's inbox.
    present_token: bytes
    created_at: int
    expires_at: int
    signature: bytes = b""

    def body(self) -> bytes:
        w = Writer().raw(MAGIC).fixed(self.introducer_uik, 32).fixed(self.recipient_uik, 32)
        w.var8(self.local.encode("ascii")).fixed(self.onion_pk, 32).fixed(self.uik_pk, 32)
        w.fixed(self.admit_token, TOKEN_BYTES).fixed(self.present_token, TOKEN_BYTES)
        return w.u64(self.created_at).u64(self.expires_at).getvalue()

    def encode(self) -> bytes:
        return self.body() + self.signature

    def signed(self, dsk_seed: bytes) -> Introduction:
        """Signed by the introducer's device signing key."""
        _check_fields(self)
        return replace(self, signature=ed25519_sign(dsk_seed, CTX_INTRODUCTION + self.body()))

    def verify(self, dsk_pk: bytes) -> None:
        """Raise :class:`~onionpost.core.errors.BadSignature` unless ``dsk_pk`` signed it."""
        ed25519_verify(dsk_pk, CTX_INTRODUCTION + self.body(), self.signature, "introduction")

    @classmethod
    def parse(cls, data: bytes) -> Introduction:
        """Parse a record; any length is refused before anything large is read."""
        if len(data) > MAX_BYTES:
            raise MalformedData("The introduction is too long.")
        r = Reader(data, "introduction")
        r.magic(MAGIC)
        introducer = r.fixed(32, "introducer identity key")
        recipient = r.fixed(32, "recipient identity key")
        local_raw = r.var8("introduced name", MAX_LOCAL_BYTES)
        onion_pk = r.fixed(32, "introduced inbox key")
        uik_pk = r.fixed(32, "introduced identity key")
        admit = r.fixed(TOKEN_BYTES, "admit token")
        present = r.fixed(TOKEN_BYTES, "present token")
        created_at = r.u64("creation time")
        expires_at = r.u64("expiry time")
        signature = r.fixed(64, "signature")
        r.end()
        if not local_raw or any(b <= 0x20 or b >= 0x7F or b in b"@<>" for b in local_raw):
            # Printable ASCII without spaces or address punctuation; the receiver then
            # checks it is a valid onionpost address's local part.
            raise MalformedData("The introduction's name is not a mail address name.")
        intro = cls(
            introducer,
            recipient,
            local_raw.decode("ascii"),
            onion_pk,
            uik_pk,
            admit,
            present,
            created_at,
            expires_at,
            signature,
        )
        _check_fields(intro)
        return intro


def _check_fields(i: Introduction) -> None:
    """What no honest introducer produces, whatever the signature says."""
    if len(i.local.encode("ascii", "replace")) > MAX_LOCAL_BYTES or not i.local:
        raise MalformedData("The introduction's name is empty or too long.")
    if not i.created_at <= i.expires_at <= i.created_at + MAX_LIFETIME:
        raise MalformedData("The introduction's lifetime is not valid.")
    if i.admit_token == i.present_token:
        raise MalformedData("The introduction's two tokens are the same.")
    if len({i.introducer_uik, i.recipient_uik, i.uik_pk}) != 3:
        raise MalformedData("The introduction names the same person twice.")


def open_introduction(
    data: bytes, *, dsk_pk: bytes, sender_uik: bytes, reader_uik: bytes, now: int
) -> Introduction:
    """Parse and check an introduction that arrived in a verified message.

    ``dsk_pk`` and ``sender_uik`` are the message's signing key and sender identity, both
    already verified (:func:`~onionpost.core.crypto.sender.verify_sender`); ``reader_uik`` is the
    receiving user's identity key.  Raises a :class:`~onionpost.core.errors.CryptoError` for a
    record that is malformed, not signed by the sender's device, from someone other than the
    sender, meant for someone else, or expired.
    """
    intro = Introduction.parse(data)
    intro.verify(dsk_pk)
    if intro.introducer_uik != sender_uik:
        raise MalformedData("The introduction names an introducer other than its sender.")
    if intro.recipient_uik != reader_uik:
        raise MalformedData("The introduction is meant for someone else.")
    if intro.expires_at < now:
        raise MessageExpired("The introduction has expired.")
    return intro


def introduction_pair(
    *,
    introducer_uik: bytes,
    b: tuple[str, bytes, bytes],
    c: tuple[str, bytes, bytes],
    token_b: bytes,
    token_c: bytes,
    created_at: int,
    expires_at: int,
    dsk_seed: bytes,
) -> tuple[Introduction, Introduction]:
    """The two signed records of ``A introduces B to C``: (the one for B, the one for C).

    ``b`` and ``c`` are ``(local, onion_pk, uik_pk)``.  ``token_b`` is the token C presents
    at B's inbox (B registers it on acceptance), ``token_c`` the one B presents at C's.
    """
    for_b = Introduction(
        introducer_uik, b[2], c[0], c[1], c[2], token_b, token_c, created_at, expires_at
    ).signed(dsk_seed)
    for_c = Introduction(
        introducer_uik, c[2], b[0], b[1], b[2], token_c, token_b, created_at, expires_at
    ).signed(dsk_seed)
    return for_b, for_c
