"""A small, deterministic world of users, devices, inboxes and messages for the crypto tests.

Everything is derived from :class:`SeededRandom`, so a failing case reproduces exactly; the
helpers only assemble the public API of ``onionpost.core.crypto`` (no I/O, time passed in).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from onionpost.core.crypto import envelope as env
from onionpost.core.crypto.bundle import (
    AntiSpamPolicy,
    KeyBundle,
    Pin,
    VerifiedBundle,
    verify_bundle,
)
from onionpost.core.crypto.envelope import (
    HasherFactory,
    OpenedMessage,
    OuterMeta,
    SealedInner,
    SenderKeys,
    StanzaTarget,
    open_inner,
    open_outer,
    seal_inner,
    seal_outer,
)
from onionpost.core.crypto.keys import (
    DeviceList,
    DeviceSecrets,
    IdentitySecrets,
    Profile,
    RevokedDevice,
    RotationRecord,
    ServerBinding,
    ServerSecrets,
)
from onionpost.core.crypto.primitives import (
    RandomSource,
    SeededRandom,
    StreamOpener,
    StreamSealer,
    aead_encrypt,
    ed25519_sign,
    hash32,
    hasher,
    kdf,
    x25519,
    x25519_public,
)

NOW = 1_700_000_000
DAY = 86_400
MAX_L2 = 64 << 20


class SeenSet:
    """An in-memory replay memory; ``seen`` answers and records, like the device database."""

    def __init__(self) -> None:
        self.ids: set[bytes] = set()

    def seen(self, msg_id: bytes) -> bool:
        if msg_id in self.ids:
            return True
        self.ids.add(msg_id)
        return False


class NeverSeen:
    def seen(self, msg_id: bytes) -> bool:
        return False


class AlwaysSeen:
    def seen(self, msg_id: bytes) -> bool:
        return True


@dataclass
class User:
    local: str
    identity: IdentitySecrets
    server: ServerSecrets
    devices: list[DeviceSecrets]
    device_list: DeviceList
    binding: ServerBinding
    profile: Profile | None = None
    chains: dict[bytes, tuple[RotationRecord, ...]] = field(default_factory=dict)

    @property
    def uik_pk(self) -> bytes:
        return self.identity.uik_pk

    @property
    def onion_pk(self) -> bytes:
        return self.server.onion_pk

    @property
    def mailbox_id(self) -> bytes:
        return self.binding.mailbox_id

    def sender(self, index: int = 0) -> SenderKeys:
        dev = self.devices[index]
        return SenderKeys(
            self.local, self.onion_pk, self.uik_pk, dev.device_id, dev.dsk_seq, dev.dsk_seed
        )

    def target(self, index: int) -> StanzaTarget:
        spk = self.devices[index].signed_prekey()
        return StanzaTarget(spk.spk_id, spk.spk_pk)

    def targets(self, skip: int | None = None) -> list[StanzaTarget]:
        return [self.target(i) for i in range(len(self.devices)) if i != skip]

    def prekeys(self, index: int) -> list[tuple[int, bytes]]:
        return [(p.spk_id, p.secret) for p in self.devices[index].prekeys]

    def resign_device_list(
        self, now: int, *, version: int | None = None, revoked: Sequence[bytes] = ()
    ) -> DeviceList:
        """A new UIK-signed device list over the current devices (minus ``revoked``)."""
        old = self.device_list
        added = {d.device_id: d.added_at for d in old.devices}
        entries = tuple(
            d.entry(added.get(d.device_id, now)) for d in self.devices if d.device_id not in revoked
        )
        rv = tuple(old.revoked) + tuple(RevokedDevice(i, now) for i in revoked)
        self.device_list = DeviceList(
            self.uik_pk,
            old.version + 1 if version is None else version,
            now,
            entries,
            rv,
        ).signed(self.identity.uik_seed)
        if revoked:
            self.devices = [d for d in self.devices if d.device_id not in revoked]
        return self.device_list

    def bundle(self, *, policy: AntiSpamPolicy | None = None) -> KeyBundle:
        chains = {d.device_id: tuple(d.chain) for d in self.devices if d.chain}
        chains.update(self.chains)
        return KeyBundle(
            self.local,
            self.binding,
            self.device_list,
            chains,
            tuple(d.signed_prekey() for d in self.devices),
            policy or AntiSpamPolicy(19, True, 64 << 20),
            self.profile,
        )

    def verified(self, now: int = NOW, pin: Pin | None = None) -> VerifiedBundle:
        return verify_bundle(
            KeyBundle.parse(self.bundle().encode()),
            onion_pk=self.onion_pk,
            local=self.local,
            now=now,
            pin=pin,
        )


def make_user(
    local: str, n_devices: int, rng: RandomSource, now: int = NOW, *, profile: bool = False
) -> User:
    identity = IdentitySecrets.generate(local, now, rng=rng)
    server = ServerSecrets.generate(now, rng=rng)
    devices = [DeviceSecrets.generate(f"device {i}", now, rng=rng) for i in range(n_devices)]
    dl = DeviceList(identity.uik_pk, 1, now, tuple(d.entry(now) for d in devices)).signed(
        identity.uik_seed
    )
    sek = server.current()
    binding = (
        ServerBinding(
            identity.uik_pk,
            server.onion_pk,
            rng(16),
            local,
            sek.sek_id,
            sek.public,
            now,
            now + 30 * DAY,
        )
        .signed(identity.uik_seed)
        .countersigned(server.onion_seed)
    )
    prof = (
        Profile(identity.uik_pk, now, f"{local.title()} Example", "image/png", b"\x89PNG").signed(
            identity.uik_seed
        )
        if profile
        else None
    )
    return User(local, identity, server, devices, dl, binding, prof)


def seal_l2(
    sender: User,
    recipients: Sequence[User],
    body: bytes,
    rng: RandomSource,
    *,
    now: int = NOW,
    lifetime: int = 7 * DAY,
    include_own_devices: bool = True,
    sender_device: int = 0,
    hashers: HasherFactory = hasher,
    with_digest: bool = True,
) -> tuple[bytes, SealedInner]:
    """L2 bytes for a message from ``sender``'s device to every device of ``recipients`` and
    (optionally) to the sender's own other devices."""
    targets: list[StanzaTarget] = []
    uiks = [r.uik_pk for r in recipients]
    for r in recipients:
        targets += r.targets()
    if include_own_devices and len(sender.devices) > 1:
        targets += sender.targets(skip=sender_device)
        uiks.append(sender.uik_pk)
    sink = io.BytesIO()
    sealed = seal_inner(
        sender=sender.sender(sender_device),
        targets=targets,
        recipient_uiks=uiks,
        body=body,
        created_at=now,
        expires_at=now + lifetime,
        sink=sink,
        rng=rng,
        hashers=hashers,
        with_digest=with_digest,
    )
    return sink.getvalue(), sealed


def seal_l1(l2: bytes, recipient: User, rng: RandomSource, *, now: int = NOW) -> bytes:
    sink = io.BytesIO()
    n = seal_outer(
        io.BytesIO(l2),
        len(l2),
        sek_id=recipient.binding.sek_id,
        sek_pk=recipient.binding.sek_pk,
        mailbox_id=recipient.mailbox_id,
        not_after=now + 7 * DAY,
        sink=sink,
        token=bytes(range(32)),
        rng=rng,
    )
    data = sink.getvalue()
    assert n == len(data)
    return data


def open_l1(
    l1: bytes, recipient: User, *, now: int = NOW, hashers: HasherFactory = hasher
) -> tuple[OuterMeta, bytes]:
    out = io.BytesIO()

    def server_key(sek_id: int) -> bytes | None:
        key = recipient.server.by_id(sek_id)
        return key.secret if key else None

    meta = open_outer(
        io.BytesIO(l1),
        len(l1),
        server_key=server_key,
        now=now,
        max_l2_bytes=MAX_L2,
        l2_sink=out,
        hashers=hashers,
    )
    return meta, out.getvalue()


def open_l2(
    l2: bytes,
    reader: User,
    device: int,
    *,
    now: int = NOW,
    seen: object | None = None,
    length: int | None = None,
    hashers: HasherFactory = hasher,
) -> tuple[OpenedMessage, bytes]:
    out = io.BytesIO()
    msg = open_inner(
        io.BytesIO(l2),
        len(l2) if length is None else length,
        prekeys=reader.prekeys(device),
        reader_uik=reader.uik_pk,
        now=now,
        seen=seen or NeverSeen(),  # type: ignore[arg-type]
        sink=out,
        hashers=hashers,
    )
    return msg, out.getvalue()


def world(seed: bytes = b"world") -> tuple[SeededRandom, User, User, User]:
    """alice (2 devices), bob (3 devices), carol (1 device)."""
    rng = SeededRandom(seed)
    return (
        rng,
        make_user("alice", 2, rng),
        make_user("bob", 3, rng),
        make_user("carol", 1, rng),
    )


# --- internals, for attacks that a recipient or a malicious sender can mount -------------------


def l2_layout(l2: bytes) -> tuple[int, int]:
    """(number of stanzas, offset of the secretstream header) of an L2."""
    n = int.from_bytes(l2[5:7], "big")
    return n, 7 + n * env.STANZA_BYTES + 32


def recover_l3(l2: bytes, reader: User, device: int) -> tuple[bytes, bytes]:
    """What a recipient device can compute: (file key, whole decrypted L3 plaintext)."""
    n, ss_at = l2_layout(l2)
    file_key = env._unwrap_file_key(l2[7 : 7 + n * env.STANZA_BYTES], n, reader.prekeys(device))
    opener = StreamOpener(kdf(file_key, env.CTX_PAYLOAD), l2[ss_at : ss_at + 24])
    out: list[bytes] = []
    env._stream_open(opener, io.BytesIO(l2[ss_at + 24 :]), len(l2) - ss_at - 24, out.append)
    return file_key, b"".join(out)


def wrap_l3(l3: bytes, targets: Sequence[StanzaTarget], rng: RandomSource) -> bytes:
    """A fresh L2 (new file key, new stanzas) around existing L3 plaintext: a re-wrap."""
    file_key = rng(32)
    header = env._l2_header(file_key, targets, rng)
    return wrap_l3_with(l3, header, file_key, rng)


def wrap_l3_with(l3: bytes, l2_header: bytes, file_key: bytes, rng: RandomSource) -> bytes:
    sink = io.BytesIO()
    env._encrypt_l2(
        l2_header=l2_header, file_key=file_key, l3_segments=[l3], l3_len=len(l3), rng=rng, sink=sink
    )
    return sink.getvalue()


def forge_l3(
    sender: User,
    l2_header: bytes,
    body: bytes,
    *,
    recipients: Sequence[bytes],
    now: int = NOW,
    sender_device: int = 0,
    overrides: Mapping[str, object] | None = None,
) -> bytes:
    """L3 plaintext as a (possibly malicious) sender would write it, validly signed, with any
    :class:`ContentHeader` field or ``body_hash`` / ``signature`` / ``header_bytes`` replaced."""
    overrides = dict(overrides or {})
    dev = sender.devices[sender_device]
    uiks = tuple(sorted(recipients))
    fields: dict[str, object] = {
        "msg_id": bytes(range(16)),
        "created_at": now,
        "expires_at": now + DAY,
        "sender_local": sender.local,
        "sender_onion_pk": sender.onion_pk,
        "sender_uik": sender.uik_pk,
        "sender_device_id": dev.device_id,
        "sender_dsk_seq": dev.dsk_seq,
        "sender_dsk_pk": dev.dsk_pk,
        "recipients": uiks,
        "recipients_hash": env.recipients_hash(uiks),
        "l2_header_hash": hash32(l2_header),
        "content_type": env.CONTENT_RFC5322,
        "extensions": (),
        "body_len": len(body),
    }
    special = ("body_hash", "signature", "header_bytes")
    extra = {k: overrides.pop(k) for k in special if k in overrides}
    fields.update(overrides)
    header = extra.get("header_bytes") or env.ContentHeader(**fields).encode()  # type: ignore[arg-type]
    assert isinstance(header, bytes)
    body_hash = extra.get("body_hash") or hash32(body)
    assert isinstance(body_hash, bytes)
    signature = extra.get("signature") or ed25519_sign(
        dev.dsk_seed, env.CTX_CONTENT + header + body_hash
    )
    assert isinstance(signature, bytes)
    return len(header).to_bytes(4, "big") + header + body + body_hash + signature


def forged_message(
    sender: User,
    reader: User,
    body: bytes,
    rng: RandomSource,
    *,
    recipients: Sequence[bytes] | None = None,
    fields: Mapping[str, object] | None = None,
    **overrides: object,
) -> bytes:
    """A whole L2 from a malicious sender: correct stanzas for ``reader``'s devices, an L3
    built by :func:`forge_l3`."""
    file_key = rng(32)
    header = env._l2_header(file_key, reader.targets(), rng)
    l3 = forge_l3(
        sender,
        header,
        body,
        recipients=[reader.uik_pk] if recipients is None else recipients,
        overrides={**(fields or {}), **overrides},
    )
    return wrap_l3_with(l3, header, file_key, rng)


def build_l1(
    l2: bytes,
    recipient: User,
    rng: RandomSource,
    *,
    meta: bytes | None = None,
    pad_byte: int = 0,
    extra_plain: int = 0,
    l2_len: int | None = None,
    not_after: int = NOW + DAY,
    auth: int = env.AUTH_TOKEN,
) -> bytes:
    """An L1 built by hand from the module's pieces, so a malicious sender's choices (bad
    padding, lying lengths, unknown proof kinds) can be tried."""
    sek_pk = recipient.binding.sek_pk
    eph = rng(32)
    eph_pk = x25519_public(eph)
    meta_key, stream_key = env._server_keys(x25519(eph, sek_pk), eph_pk, sek_pk)
    meta = meta or (
        recipient.mailbox_id
        + bytes([auth])
        + bytes(32)
        + bytes(13)
        + not_after.to_bytes(8, "big")
        + (len(l2) if l2_len is None else l2_len).to_bytes(8, "big")
    )
    nonce = rng(24)
    fixed = env.L1_MAGIC + recipient.binding.sek_id.to_bytes(4, "big") + eph_pk + nonce
    ss_header = rng(24)
    _, plain_len = env._solve_padding(len(l2))
    plain_len += extra_plain
    plain = l2 + bytes([pad_byte]) * (plain_len - len(l2))
    sink = io.BytesIO()
    sink.write(fixed + aead_encrypt(meta_key, nonce, meta, fixed) + ss_header)
    for _ in env._stream_seal(StreamSealer(stream_key, ss_header), [plain], len(plain), sink):
        pass
    return sink.getvalue()
