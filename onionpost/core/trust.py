"""What a person compares to trust a contact's key: typed fingerprints and scanned QR codes.

A fingerprint (:func:`onionpost.core.crypto.fingerprint.fingerprint`) is 20 base32 characters
shown in groups of four.  People read them aloud, copy them from a chat, or type them from a
piece of paper, so what they type is compared without regard to case, spaces or dashes — but
every one of the 20 characters must be there and match: a prefix is not accepted, because
accepting a key after comparing half of it is how a near-collision gets through.

The QR code ``onionpost contacts me --qr`` draws carries the text::

    onionpost:<local>@<onion>.onion#<fingerprint>

(the fingerprint in its displayed form, e.g. ``onionpost:bob@abc…xyz.onion#ab3d-efgh-…``).
The address is the one the fingerprint belongs to, so a code scanned for one person cannot
verify another.  This module is pure: no I/O, no clock.
"""

from __future__ import annotations

import re

from onionpost.core.address import Address
from onionpost.core.crypto.fingerprint import fingerprint
from onionpost.core.errors import AddressError, UsageError

#: The folder mail from a not-yet-accepted identity key is held in (created, subscribed, in
#: every mailbox; see gateway.dovecot).
QUARANTINE = "Quarantine"
#: The header every held message carries, and the notice that goes with it.
KEY_CHANGE_HEADER = "X-Onionpost-Key-Change"
SCAN_SCHEME = "onionpost:"
_FINGERPRINT_CHARS = re.compile(r"^[a-z2-7]{20}$")


def compact(text: str) -> str:
    """``text`` as a bare fingerprint: lower case, without spaces, dashes, dots or colons."""
    return re.sub(r"[\s\-.:_]", "", text).lower()


def fingerprint_matches(typed: str, uik_pk: bytes) -> bool:
    """Whether ``typed`` is the whole fingerprint of ``uik_pk`` (case, spaces and dashes
    aside)."""
    return compact(typed) == compact(fingerprint(uik_pk))


def check_typed(typed: str) -> str:
    """The compact form of a typed fingerprint, or a UsageError saying what is wrong with it."""
    bare = compact(typed)
    if not bare:
        raise UsageError("Type the fingerprint your contact read to you (20 letters and digits).")
    if not _FINGERPRINT_CHARS.fullmatch(bare):
        raise UsageError(
            f"'{typed}' is not a fingerprint: a fingerprint is 20 characters, the letters a-z "
            "and the digits 2-7, usually shown in five groups of four."
        )
    return bare


def scan_payload(address: Address, uik_pk: bytes) -> str:
    """The text of one's own QR code (``onionpost contacts me --qr``)."""
    return f"{SCAN_SCHEME}{address}#{fingerprint(uik_pk)}"


def parse_scan(text: str) -> tuple[Address, str]:
    """The address and compact fingerprint a scanned QR code carries; a UsageError if the
    text is not one of ours."""
    s = text.strip()
    if not s.lower().startswith(SCAN_SCHEME):
        raise UsageError(
            f"'{text}' is not an onionpost contact code: it should start with '{SCAN_SCHEME}' "
            "(scan the code `onionpost contacts me --qr` shows on your contact's device)."
        )
    address_text, sep, fp = s[len(SCAN_SCHEME) :].rpartition("#")
    if not sep:
        raise UsageError(f"'{text}' has no fingerprint: it should end with '#' and one.")
    try:
        address = Address.parse(address_text)
    except AddressError as exc:
        raise UsageError(f"The scanned code's address is not valid: {exc}") from exc
    return address, check_typed(fp)
