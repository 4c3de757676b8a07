"""Proving who sent a message, offline.

The envelope's signature proves that the device key named in the header signed the message.
What ties that device key to a person is the sender's identity key (UIK).  So the sender
carries its credentials inside the signed content (extension :data:`EXT_SENDER_KEYS`): the
UIK-signed server binding (which proves the UIK owns ``local@<onion>``), the UIK-signed
device list, and the sending device's rotation chain.  :func:`verify_sender` checks them
against the recipient's pin of that contact, so a message from a contact whose inbox is
offline can still be verified and filed (the same idea as Autocrypt's key gossip).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from onionpost.core.crypto.bundle import DeviceHead, Pin
from onionpost.core.crypto.encoding import Reader, Writer
from onionpost.core.crypto.envelope import ContentHeader
from onionpost.core.crypto.keys import DeviceList, RotationRecord, ServerBinding, verify_chain
from onionpost.core.errors import (
    BindingMismatch,
    DeviceListRollback,
    IdentityKeyChanged,
    KeyBundleError,
    RotationChainForked,
)

EXT_SENDER_KEYS = 3


@dataclass(frozen=True)
class SenderCredentials:
    binding: ServerBinding
    device_list: DeviceList
    chain: tuple[RotationRecord, ...]

    def encode(self) -> bytes:
        w = Writer().var16(self.binding.encode()).var32(self.device_list.encode())
        w.u16(len(self.chain))
        for rec in self.chain:
            w.var16(rec.encode())
        return w.getvalue()

    @classmethod
    def parse(cls, data: bytes) -> SenderCredentials:
        r = Reader(data, "sender credentials")
        binding = ServerBinding.parse(r.var16("server binding"))
        device_list = DeviceList.parse(r.var32("device list", 60 * 1024))
        chain = tuple(
            RotationRecord.parse(r.var16("rotation")) for _ in range(r.count("rotations", 256))
        )
        r.end()
        return cls(binding, device_list, chain)


#: Credentials up to this size are remembered once they verified (a binding and a device
#: list of a few devices are under 1 KiB; a device list may be up to 60 KiB).
MEMO_BYTES = 8 << 10
#: How many distinct credential blobs are remembered (least recently used first out): at most
#: MEMO_ENTRIES x MEMO_BYTES = 2 MiB, and in practice one blob per contact's device.
MEMO_ENTRIES = 256


def checked_credentials(credentials: bytes) -> SenderCredentials:
    """``credentials`` parsed, with the signatures that are *inside* them checked: the
    binding's two (the UIK's and the inbox's countersignature) and the device list's.

    A pure function of the bytes: parsing is deterministic, and an Ed25519 verification is a
    deterministic function of the key, the signed bytes and the signature, all three taken
    from ``credentials``.  So the answer for byte-identical credentials (every message of a
    contact's device carries the same blob until their keys change) is remembered, keyed by
    the exact bytes, not by a hash of them; only blobs that verified are remembered (a failure
    raises and is not kept).  Nothing about the *message* is remembered: its own signature is
    checked in :func:`~onionpost.core.crypto.envelope.open_inner` every time, and everything
    that ties these credentials to it and to the recipient's pin (identity, address, device,
    key history, revocation, rollback) is checked by :func:`verify_sender` every time.  The
    rotation records' signatures are checked there too (``verify_chain``), since the chain is
    usually empty.  See docs/threat-model.md, "Remembered checks".
    """
    if len(credentials) > MEMO_BYTES:
        return _check_credentials(credentials)
    return _checked_credentials_memo(credentials)


def _check_credentials(credentials: bytes) -> SenderCredentials:
    creds = SenderCredentials.parse(credentials)
    creds.binding.verify()
    creds.device_list.verify()
    return creds


# lru_cache keeps only returned values (an exception is never cached) and is thread-safe;
# the cached SenderCredentials is frozen, its parts tuples, so callers cannot alter it.
_checked_credentials_memo = functools.lru_cache(maxsize=MEMO_ENTRIES)(_check_credentials)


@dataclass(frozen=True)
class VerifiedSender:
    address_local: str
    onion_pk: bytes
    uik_pk: bytes
    device_id: bytes
    device_name: str
    #: The pin to remember for this contact after this message (never older than before).
    pin: Pin
    first_contact: bool
    #: The device list the message carried (verified), for the contact's record.
    device_list: DeviceList


def pin_encode(pin: Pin) -> bytes:
    w = Writer().raw(b"OPpn").fixed(pin.uik_pk, 32).u32(pin.device_list_version)
    w.fixed(pin.device_list_digest, 32).u16(len(pin.heads))
    for device_id in sorted(pin.heads):
        h = pin.heads[device_id]
        w.fixed(device_id, 16).u32(h.seq).fixed(h.pk, 32).fixed(h.genesis_pk, 32)
    return w.getvalue()


def pin_parse(data: bytes) -> Pin:
    r = Reader(data, "contact pin")
    r.magic(b"OPpn")
    uik = r.fixed(32, "identity key")
    version = r.u32("device list version")
    digest = r.fixed(32, "device list digest")
    heads = {}
    for _ in range(r.count("devices", 1024)):
        device_id = r.fixed(16, "device id")
        heads[device_id] = DeviceHead(
            r.u32("sequence"), r.fixed(32, "key"), r.fixed(32, "first key")
        )
    r.end()
    return Pin(uik, version, digest, heads)


def verify_sender(
    header: ContentHeader,
    credentials: bytes | None,
    pin: Pin | None,
    known_list: DeviceList | None = None,
) -> VerifiedSender:
    """Check that the header's device key belongs to the sender's identity and address.

    ``known_list`` is the newest device list the recipient has seen for this contact: a
    message from a device it revoked, written after the revocation, is refused even if the
    message carries an older list that still names the device.
    """
    if credentials is None:
        raise KeyBundleError("The message does not carry its sender's credentials.")
    creds = checked_credentials(credentials)
    binding, dl = creds.binding, creds.device_list
    if binding.uik_pk != header.sender_uik or dl.uik_pk != header.sender_uik:
        raise KeyBundleError("The sender's credentials belong to a different identity.")
    if binding.onion_pk != header.sender_onion_pk or binding.local != header.sender_local:
        raise BindingMismatch("The sender's identity is not bound to the address it claims.")
    if pin is not None and pin.uik_pk != header.sender_uik:
        raise IdentityKeyChanged()
    _check_not_revoked(header, known_list)
    entry = dl.device(header.sender_device_id)
    pinned = pin.heads.get(header.sender_device_id) if pin else None
    if entry is None:
        raise KeyBundleError("The message was signed by a device that is not on the sender's list.")
    genesis = pinned.genesis_pk if pinned else (entry.dsk_pk if not creds.chain else None)
    head, keys = verify_chain(header.sender_device_id, creds.chain, genesis)
    if keys.get(entry.dsk_seq) != entry.dsk_pk:
        raise KeyBundleError("The sender's device list and key history disagree.")
    if keys.get(header.sender_dsk_seq) != header.sender_dsk_pk:
        raise KeyBundleError("The message was signed by a key that is not the sender device's.")
    if pinned is not None and pinned.seq <= head.seq and keys.get(pinned.seq) != pinned.pk:
        raise RotationChainForked()
    if (
        pin is not None
        and dl.version == pin.device_list_version
        and dl.digest() != pin.device_list_digest
    ):
        raise DeviceListRollback(
            f"Two different device lists both claim version {dl.version}; the sender's "
            "identity key may have been misused."
        )
    new_pin = _merge_pin(
        pin, dl, header.sender_device_id, DeviceHead(head.seq, head.pk, head.genesis_pk)
    )
    return VerifiedSender(
        header.sender_local,
        header.sender_onion_pk,
        header.sender_uik,
        entry.device_id,
        entry.name,
        new_pin,
        pin is None,
        dl,
    )


def _check_not_revoked(header: ContentHeader, known_list: DeviceList | None) -> None:
    if known_list is None or known_list.uik_pk != header.sender_uik:
        return
    for rv in known_list.revoked:
        if rv.device_id == header.sender_device_id and header.created_at >= rv.revoked_at:
            raise KeyBundleError(
                "The message was signed by a device the sender has revoked (it may have been "
                "lost or stolen)."
            )


def _merge_pin(pin: Pin | None, dl: DeviceList, device_id: bytes, head: DeviceHead) -> Pin:
    """Advance the pin; an older device list in a message (written earlier) never lowers it."""
    heads = dict(pin.heads) if pin else {}
    old = heads.get(device_id)
    if old is None or head.seq > old.seq:
        heads[device_id] = head
    if pin is None or dl.version > pin.device_list_version:
        return Pin(dl.uik_pk, dl.version, dl.digest(), heads)
    return Pin(pin.uik_pk, pin.device_list_version, pin.device_list_digest, heads)
