"""Test vectors for ``docs/protocol.md``, derived from fixed seeds.

``generate()`` rebuilds every vector block from :class:`SeededRandom`; the blocks in the
document sit between ``<!-- vectors:begin NAME -->`` and ``<!-- vectors:end NAME -->``.
``python -m tests.unit.protocol_vectors --write`` rewrites them in place, and
``tests/unit/test_protocol_vectors.py`` fails when the document and the code disagree.

Derived values (stanza keys, file key, server keys) are recomputed here from the
*recipient's* side with the primitives alone, as an independent implementation would, and
every annotated dump must concatenate back to the exact encoding, so the field tables in the
document cannot drift from the bytes.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from onionpost.core.address import onion_from_public_key, tor_service_key_blob
from onionpost.core.crypto import envelope as env
from onionpost.core.crypto.bundle import AntiSpamPolicy, KeyBundle, verify_bundle
from onionpost.core.crypto.fingerprint import fingerprint, safety_number
from onionpost.core.crypto.introduction import (
    CTX_INTRODUCTION,
    Introduction,
    introduction_pair,
    open_introduction,
)
from onionpost.core.crypto.keys import (
    DeviceEntry,
    DeviceList,
    DeviceSecrets,
    IdentitySecrets,
    Profile,
    RevokedDevice,
    RotationRecord,
    ServerBinding,
    ServerSecrets,
    SignedPrekey,
    genesis_hash,
)
from onionpost.core.crypto.padding import bucket as padding_bucket
from onionpost.core.crypto.pow import mint
from onionpost.core.crypto.primitives import (
    SeededRandom,
    StreamOpener,
    aead_decrypt,
    ed25519_sign,
    ed25519_verify,
    hash32,
    kdf,
    mac32,
    x25519,
    x25519_public,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
SEED = b"onionpost/v1 test vectors"
NOW = 1_700_000_000  # 2023-11-14 22:13:20 UTC
DAY = 86_400
WIDTH = 32  # bytes per hex line


def _hex_lines(data: bytes, indent: str = "") -> list[str]:
    if not data:
        return [indent + "(empty)"]
    return [indent + data[i : i + WIDTH].hex() for i in range(0, len(data), WIDTH)]


@dataclass
class Dump:
    """Splits an encoding into named fields, in order, and renders them one per line."""

    title: str
    data: bytes
    fields: list[tuple[str, bytes]] = field(default_factory=list)
    pos: int = 0

    def take(self, name: str, n: int) -> bytes:
        piece = self.data[self.pos : self.pos + n]
        assert len(piece) == n, (self.title, name)
        self.fields.append((name, piece))
        self.pos += n
        return piece

    def int(self, name: str, n: int) -> int:
        return int.from_bytes(self.take(name, n), "big")

    def render(self, *, full: bool = True) -> str:
        assert self.pos == len(self.data), f"{self.title}: {len(self.data) - self.pos} left"
        assert b"".join(v for _, v in self.fields) == self.data
        out = [f"{self.title}: {len(self.data)} bytes, BLAKE2b-256 {hash32(self.data).hex()}"]
        name_w = max(len(n) for n, _ in self.fields) + 2
        for name, value in self.fields:
            lines = _hex_lines(value)
            out.append(f"  {name.ljust(name_w)}{lines[0]}")
            out += [f"  {' ' * name_w}{line}" for line in lines[1:]]
        if full:
            out.append("  whole:")
            out += _hex_lines(self.data, "    ")
        return "\n".join(out)


def _kv(title: str, rows: list[tuple[str, bytes | int | str]]) -> str:
    name_w = max(len(n) for n, _ in rows) + 2
    out = [title]
    for name, value in rows:
        if isinstance(value, bytes):
            lines = _hex_lines(value)
            out.append(f"  {name.ljust(name_w)}{lines[0]}")
            out += [f"  {' ' * name_w}{line}" for line in lines[1:]]
        else:
            out.append(f"  {name.ljust(name_w)}{value}")
    return "\n".join(out)


# --- the world ----------------------------------------------------------------------------------


@dataclass
class World:
    rng: SeededRandom
    alice_id: IdentitySecrets
    alice_server: ServerSecrets
    alice_dev: DeviceSecrets
    alice_binding: ServerBinding
    bob_id: IdentitySecrets
    bob_server: ServerSecrets
    bob_devs: list[DeviceSecrets]
    bob_revoked: DeviceSecrets
    bob_dl: DeviceList
    bob_binding: ServerBinding
    bob_profile: Profile
    bob_bundle: KeyBundle


def build_world() -> World:
    rng = SeededRandom(SEED)
    alice_id = IdentitySecrets.generate("alice", NOW, rng=rng)
    alice_server = ServerSecrets.generate(NOW, rng=rng)
    alice_dev = DeviceSecrets.generate("alice laptop", NOW, rng=rng)
    alice_binding = (
        ServerBinding(
            alice_id.uik_pk,
            alice_server.onion_pk,
            rng(16),
            "alice",
            alice_server.current().sek_id,
            alice_server.current().public,
            NOW,
            NOW + 30 * DAY,
        )
        .signed(alice_id.uik_seed)
        .countersigned(alice_server.onion_seed)
    )

    bob_id = IdentitySecrets.generate("bob", NOW, rng=rng)
    bob_server = ServerSecrets.generate(NOW, rng=rng)
    laptop = DeviceSecrets.generate("bob laptop", NOW, rng=rng)
    phone = DeviceSecrets.generate("bob phone", NOW, rng=rng)
    tablet = DeviceSecrets.generate("bob tablet", NOW, rng=rng)
    laptop.rotate_signing_key(NOW + 60, rng=rng)  # seq 0 -> 1; the device list still names 0
    laptop.new_prekey(NOW + 60, 7 * DAY, rng=rng)  # a prekey signed by key seq 1
    bob_dl = DeviceList(
        bob_id.uik_pk,
        2,
        NOW + 120,
        (
            DeviceEntry(laptop.device_id, laptop.genesis_pk, 0, NOW, laptop.name),
            phone.entry(NOW),
        ),
        (RevokedDevice(tablet.device_id, NOW + 120),),
    ).signed(bob_id.uik_seed)
    bob_binding = (
        ServerBinding(
            bob_id.uik_pk,
            bob_server.onion_pk,
            rng(16),
            "bob",
            bob_server.current().sek_id,
            bob_server.current().public,
            NOW,
            NOW + 30 * DAY,
        )
        .signed(bob_id.uik_seed)
        .countersigned(bob_server.onion_seed)
    )
    bob_profile = Profile(
        bob_id.uik_pk, NOW, "Bob", "image/png", bytes.fromhex("89504e470d0a1a0a")
    ).signed(bob_id.uik_seed)
    bundle = KeyBundle(
        "bob",
        bob_binding,
        bob_dl,
        {laptop.device_id: tuple(laptop.chain)},
        (laptop.signed_prekey(), phone.signed_prekey()),
        AntiSpamPolicy(19, True, 64 << 20),
        bob_profile,
    )
    return World(
        rng,
        alice_id,
        alice_server,
        alice_dev,
        alice_binding,
        bob_id,
        bob_server,
        [laptop, phone],
        tablet,
        bob_dl,
        bob_binding,
        bob_profile,
        bundle,
    )


# --- dumps of each structure ------------------------------------------------------------------


def dump_device_list(dl: DeviceList) -> Dump:
    d = Dump("DeviceList", dl.encode())
    d.take("magic", 4)
    d.take("uik_pk", 32)
    d.take("version u32", 4)
    d.take("issued_at u64", 8)
    n = d.int("devices u16", 2)
    for i in range(n):
        d.take(f"[{i}].device_id", 16)
        d.take(f"[{i}].dsk_pk", 32)
        d.take(f"[{i}].dsk_seq u32", 4)
        d.take(f"[{i}].added_at u64", 8)
        d.take(f"[{i}].name", 1 + d.data[d.pos])
    n = d.int("revoked u16", 2)
    for i in range(n):
        d.take(f"revoked[{i}].device_id", 16)
        d.take(f"revoked[{i}].revoked_at u64", 8)
    d.take("signature", 64)
    return d


def dump_rotation(rec: RotationRecord) -> Dump:
    d = Dump("RotationRecord", rec.encode())
    d.take("magic", 4)
    d.take("device_id", 16)
    d.take("seq u32", 4)
    d.take("old_pk", 32)
    d.take("new_pk", 32)
    d.take("prev_hash", 32)
    d.take("not_before u64", 8)
    d.take("sig_old", 64)
    d.take("sig_new", 64)
    return d


def dump_prekey(spk: SignedPrekey) -> Dump:
    d = Dump("SignedPrekey", spk.encode())
    d.take("magic", 4)
    d.take("device_id", 16)
    d.take("dsk_seq u32", 4)
    d.take("spk_id u32", 4)
    d.take("spk_pk", 32)
    d.take("created_at u64", 8)
    d.take("not_after u64", 8)
    d.take("signature", 64)
    return d


def dump_binding(b: ServerBinding) -> Dump:
    d = Dump("ServerBinding", b.encode())
    d.take("magic", 4)
    d.take("uik_pk", 32)
    d.take("onion_pk", 32)
    d.take("mailbox_id", 16)
    d.take("local", d.int("local length u8", 1))
    d.take("sek_id u32", 4)
    d.take("sek_pk", 32)
    d.take("issued_at u64", 8)
    d.take("not_after u64", 8)
    d.take("signature (UIK)", 64)
    d.take("onion_signature (onion key)", 64)
    return d


def dump_profile(p: Profile) -> Dump:
    d = Dump("Profile", p.encode())
    d.take("magic", 4)
    d.take("uik_pk", 32)
    d.take("issued_at u64", 8)
    d.take("display_name var8", 1 + d.data[d.pos])
    d.take("avatar_type var8", 1 + d.data[d.pos])
    d.take("avatar var32", 4 + int.from_bytes(d.data[d.pos : d.pos + 4], "big"))
    d.take("signature", 64)
    return d


def dump_bundle(b: KeyBundle) -> Dump:
    d = Dump("KeyBundle", b.encode())
    d.take("magic", 4)
    d.take("local var8", 1 + d.data[d.pos])
    d.take("binding var16", 2 + int.from_bytes(d.data[d.pos : d.pos + 2], "big"))
    d.take("device_list var32", 4 + int.from_bytes(d.data[d.pos : d.pos + 4], "big"))
    n = d.int("chains u16", 2)
    for i in range(n):
        d.take(f"chain[{i}].device_id", 16)
        m = d.int(f"chain[{i}].records u16", 2)
        for j in range(m):
            size = 2 + int.from_bytes(d.data[d.pos : d.pos + 2], "big")
            d.take(f"chain[{i}][{j}] var16", size)
    n = d.int("prekeys u16", 2)
    for i in range(n):
        d.take(f"prekey[{i}] var16", 2 + int.from_bytes(d.data[d.pos : d.pos + 2], "big"))
    d.take("pow_bits u8", 1)
    d.take("accepts_strangers u8", 1)
    d.take("max_envelope_bytes u64", 8)
    d.take("profile var32", 4 + int.from_bytes(d.data[d.pos : d.pos + 4], "big"))
    return d


def dump_identity_file(s: IdentitySecrets) -> Dump:
    d = Dump("IdentitySecrets (identity.key)", s.encode())
    d.take("magic", 4)
    d.take("local var8", 1 + d.data[d.pos])
    d.take("uik_seed", 32)
    d.take("created_at u64", 8)
    return d


def dump_device_file(s: DeviceSecrets) -> Dump:
    d = Dump("DeviceSecrets (device.key)", s.encode())
    d.take("magic", 4)
    d.take("device_id", 16)
    d.take("name var8", 1 + d.data[d.pos])
    d.take("dsk_seed", 32)
    d.take("dsk_seq u32", 4)
    d.take("genesis_pk", 32)
    n = d.int("chain u16", 2)
    for i in range(n):
        d.take(f"chain[{i}] var16", 2 + int.from_bytes(d.data[d.pos : d.pos + 2], "big"))
    n = d.int("prekeys u16", 2)
    for i in range(n):
        d.take(f"prekey[{i}].spk_id u32", 4)
        d.take(f"prekey[{i}].secret", 32)
        d.take(f"prekey[{i}].created_at u64", 8)
        d.take(f"prekey[{i}].not_after u64", 8)
        d.take(f"prekey[{i}].retired_at u64", 8)
    return d


def dump_server_file(s: ServerSecrets) -> Dump:
    d = Dump("ServerSecrets (server.key)", s.encode())
    d.take("magic", 4)
    d.take("onion_seed", 32)
    n = d.int("server keys u16", 2)
    for i in range(n):
        d.take(f"key[{i}].sek_id u32", 4)
        d.take(f"key[{i}].secret", 32)
        d.take(f"key[{i}].created_at u64", 8)
        d.take(f"key[{i}].retired_at u64", 8)
    return d


def dump_l3(l3: bytes) -> Dump:
    d = Dump("L3 plaintext", l3)
    hlen = d.int("header length u32", 4)
    start = d.pos
    d.take("magic", 4)
    d.take("msg_id", 16)
    d.take("created_at u64", 8)
    d.take("expires_at u64", 8)
    d.take("sender_local var8", 1 + d.data[d.pos])
    d.take("sender_onion_pk", 32)
    d.take("sender_uik", 32)
    d.take("sender_device_id", 16)
    d.take("sender_dsk_seq u32", 4)
    d.take("sender_dsk_pk", 32)
    n = d.int("recipients u16", 2)
    for i in range(n):
        d.take(f"recipient[{i}]", 32)
    d.take("recipients_hash", 32)
    d.take("l2_header_hash", 32)
    d.take("content_type u8", 1)
    n = d.int("extensions u16", 2)
    for i in range(n):
        d.take(f"ext[{i}].type u16", 2)
        d.take(f"ext[{i}].value var32", 4 + int.from_bytes(d.data[d.pos : d.pos + 4], "big"))
    body_len = d.int("body_len u64", 8)
    assert d.pos - start == hlen
    d.take("body", body_len)
    d.take("body_hash", 32)
    d.take("signature", 64)
    return d


def dump_l2_header(head: bytes) -> Dump:
    d = Dump("L2 key header", head)
    d.take("magic", 4)
    d.take("suite u8", 1)
    n = d.int("stanzas u16", 2)
    for i in range(n):
        d.take(f"stanza[{i}].type u8", 1)
        d.take(f"stanza[{i}].spk_id u32", 4)
        d.take(f"stanza[{i}].eph_pk", 32)
        d.take(f"stanza[{i}].wrapped", 48)
    d.take("header_mac", 32)
    return d


def dump_l1_fixed(fixed: bytes) -> Dump:
    d = Dump("L1 fixed part (the metadata AEAD's associated data)", fixed)
    d.take("magic", 4)
    d.take("sek_id u32", 4)
    d.take("eph_pk", 32)
    d.take("nonce", 24)
    return d


def dump_meta(meta: bytes) -> Dump:
    d = Dump("L1 metadata plaintext", meta)
    d.take("mailbox_id", 16)
    d.take("auth_kind u8", 1)
    d.take("token", 32)
    d.take("pow_bits u8", 1)
    d.take("pow_day u32", 4)
    d.take("pow_nonce u64", 8)
    d.take("not_after u64", 8)
    d.take("l2_len u64", 8)
    return d


# --- the vectors ---------------------------------------------------------------------------------


def generate() -> dict[str, str]:
    """Every vector block of docs/protocol.md, by name."""
    out: dict[str, str] = {}
    w = build_world()

    r = SeededRandom(b"example")
    out["rng"] = _kv(
        'SeededRandom(b"example"): BLAKE2b-512(key = BLAKE2b-256(seed, person="onionpost-rng"),'
        " u64 counter), concatenated",
        [("first 80 bytes", r(80)), ("next 16 bytes", r(16))],
    )
    key = bytes(range(32))
    salt = bytes(range(100, 164))
    out["kdf"] = _kv(
        "kdf(key, label, salt) = BLAKE2b-256(key = key, u16 len(label) || label || salt)",
        [
            ("key", key),
            ("label", b"onionpost/v1/stanza".decode()),
            ("salt", salt),
            ("kdf", kdf(key, b"onionpost/v1/stanza", salt)),
            ("kdf, no salt", kdf(key, b"onionpost/v1/header")),
        ],
    )

    rows = [
        "  L2 bytes      stream(L2)   bucket(182+stream)  L1 bytes     padding    L1/L2",
    ]
    for l2_len in (0, 824, 16_185, 16_186, 100_000, 1 << 20, 10 << 20, 50 << 20, (50 << 20) + 1234):
        need = env.L1_HEADER + env.stream_length(l2_len)
        total, plain = env._solve_padding(l2_len)
        rows.append(
            f"  {l2_len:<13} {env.stream_length(l2_len):<12} {padding_bucket(need):<19} "
            f"{total:<12} {plain - l2_len:<10} {total / max(l2_len, 1):.4f}"
        )
    out["padding"] = "\n".join(rows)

    laptop, phone = w.bob_devs
    out["keys"] = _kv(
        f"Key material drawn from SeededRandom({SEED!r}), in this order",
        [
            ("alice uik_seed", w.alice_id.uik_seed),
            ("alice uik_pk", w.alice_id.uik_pk),
            ("alice fingerprint", fingerprint(w.alice_id.uik_pk)),
            ("alice onion_seed", w.alice_server.onion_seed),
            ("alice onion_pk", w.alice_server.onion_pk),
            ("alice address", f"alice@{onion_from_public_key(w.alice_server.onion_pk)}.onion"),
            (
                "alice ADD_ONION key",
                "ED25519-V3:" + tor_service_key_blob(w.alice_server.onion_seed),
            ),
            ("alice device_id", w.alice_dev.device_id),
            ("alice dsk_seed", w.alice_dev.dsk_seed),
            ("alice dsk_pk", w.alice_dev.dsk_pk),
            ("bob uik_pk", w.bob_id.uik_pk),
            ("bob fingerprint", fingerprint(w.bob_id.uik_pk)),
            ("safety number", safety_number(w.alice_id.uik_pk, w.bob_id.uik_pk)),
            ("bob onion_pk", w.bob_server.onion_pk),
            ("bob address", f"bob@{onion_from_public_key(w.bob_server.onion_pk)}.onion"),
            ("bob sek_id", w.bob_server.current().sek_id),
            ("bob sek secret", w.bob_server.current().secret),
            ("bob sek_pk", w.bob_server.current().public),
            ("bob laptop device_id", laptop.device_id),
            ("bob laptop dsk_pk seq 0", laptop.genesis_pk),
            ("bob laptop dsk_pk seq 1", laptop.dsk_pk),
            ("bob laptop spk_id", laptop.current_prekey().spk_id),
            ("bob laptop spk secret", laptop.current_prekey().secret),
            ("bob laptop spk_pk", x25519_public(laptop.current_prekey().secret)),
            ("bob phone device_id", phone.device_id),
            ("bob phone spk_id", phone.current_prekey().spk_id),
            ("bob phone spk secret", phone.current_prekey().secret),
            ("bob phone spk_pk", x25519_public(phone.current_prekey().secret)),
        ],
    )
    out["device-list"] = dump_device_list(w.bob_dl).render()
    rec = laptop.chain[0]
    out["rotation"] = (
        dump_rotation(rec).render()
        + "\n"
        + _kv(
            "links",
            [
                ("genesis_hash(device_id, old_pk)", genesis_hash(laptop.device_id, rec.old_pk)),
                ("digest (next record's prev_hash)", rec.digest()),
            ],
        )
    )
    out["signed-prekey"] = dump_prekey(laptop.signed_prekey()).render()
    out["server-binding"] = dump_binding(w.bob_binding).render()
    out["profile"] = dump_profile(w.bob_profile).render()
    out["profile-card"] = dump_profile(w.bob_profile.card().signed(w.bob_id.uik_seed)).render()
    out["key-bundle"] = dump_bundle(w.bob_bundle).render()
    vb = verify_bundle(
        KeyBundle.parse(w.bob_bundle.encode()),
        onion_pk=w.bob_server.onion_pk,
        local="bob",
        now=NOW + 3600,
    )
    assert [d.device_id for d in vb.devices] == [laptop.device_id, phone.device_id]
    out["key-files"] = "\n\n".join(
        [
            dump_identity_file(w.bob_id).render(full=False),
            dump_device_file(laptop).render(full=False),
            dump_server_file(w.bob_server).render(full=False),
        ]
    )

    # --- the message -------------------------------------------------------------------------
    rng = SeededRandom(SEED + b"/message")
    body = (
        f"From: alice@{onion_from_public_key(w.alice_server.onion_pk)}.onion\r\n"
        f"To: bob@{onion_from_public_key(w.bob_server.onion_pk)}.onion\r\n"
        "Subject: test vector\r\n\r\nHello, Bob.\r\n"
    ).encode()
    created = NOW + 3600
    token = rng(32)
    sink = io.BytesIO()
    sealed = env.seal_inner(
        sender=env.SenderKeys(
            "alice",
            w.alice_server.onion_pk,
            w.alice_id.uik_pk,
            w.alice_dev.device_id,
            w.alice_dev.dsk_seq,
            w.alice_dev.dsk_seed,
        ),
        targets=[env.StanzaTarget(d.spk_id, d.spk_pk) for d in vb.devices],
        recipient_uiks=[vb.uik_pk],
        body=body,
        created_at=created,
        expires_at=created + 7 * DAY,
        sink=sink,
        extensions=[(env.EXT_TOKEN_GRANT, vb.uik_pk + token)],
        rng=rng,
    )
    l2 = sink.getvalue()
    n = int.from_bytes(l2[5:7], "big")
    head_len = 7 + n * env.STANZA_BYTES + 32
    head = l2[:head_len]

    # bob's laptop, from its own secrets only
    spk_secret = laptop.current_prekey().secret
    spk_pk = x25519_public(spk_secret)
    stanza = next(
        head[7 + i * 85 : 7 + (i + 1) * 85]
        for i in range(n)
        if int.from_bytes(head[8 + i * 85 : 12 + i * 85], "big") == laptop.current_prekey().spk_id
    )
    eph_pk = stanza[5:37]
    shared = x25519(spk_secret, eph_pk)
    stanza_key = kdf(shared, b"onionpost/v1/stanza", eph_pk + spk_pk)
    file_key = aead_decrypt(stanza_key, bytes(24), stanza[37:], stanza[:37])
    assert file_key is not None
    header_key = kdf(file_key, b"onionpost/v1/header")
    assert mac32(header_key, head[:-32]) == head[-32:]
    payload_key = kdf(file_key, b"onionpost/v1/payload")
    ss_header = l2[head_len : head_len + 24]
    opener = StreamOpener(payload_key, ss_header)
    l3_parts: list[bytes] = []
    env._stream_open(
        opener, io.BytesIO(l2[head_len + 24 :]), len(l2) - head_len - 24, l3_parts.append
    )
    l3 = b"".join(l3_parts)
    l3_dump = dump_l3(l3)
    hlen = int.from_bytes(l3[:4], "big")
    out["l3"] = (
        l3_dump.render()
        + "\n"
        + _kv(
            "signature input = CTX_CONTENT || header bytes || body_hash",
            [
                ("CTX_CONTENT", b"onionpost/v1/content\x00"),
                (
                    "BLAKE2b-256 of the input",
                    hash32(b"onionpost/v1/content\x00", l3[4 : 4 + hlen], l3[-96:-64]),
                ),
            ],
        )
    )
    out["l2"] = (
        dump_l2_header(head).render()
        + "\n"
        + _kv(
            "bob laptop opens its stanza",
            [
                ("eph_pk", eph_pk),
                ("shared = X25519(spk, eph_pk)", shared),
                ("stanza key", stanza_key),
                ("file_key", file_key),
                ("header MAC key", header_key),
                ("payload key", payload_key),
                ("secretstream header", ss_header),
                ("L2 length", len(l2)),
                ("L3 length (plaintext)", len(l3)),
                ("chunks", max(1, -(-len(l3) // env.CHUNK))),
                ("BLAKE2b-256 of the whole L2", hash32(l2)),
            ],
        )
    )
    assert sealed.digest == hash32(l2)

    stamp = mint(w.bob_binding.mailbox_id, sealed.digest, 8, created)
    out["pow"] = _kv(
        "Stamp for bob's mailbox over this L2, 8 bits (the default is 19)",
        [
            ("mailbox_id", w.bob_binding.mailbox_id),
            ("message hash (L2 digest)", sealed.digest),
            ("bits", stamp.bits),
            ("day", stamp.day),
            ("nonce", stamp.nonce),
            (
                "stamp hash",
                hash32(
                    b"onionpost/v1/pow\x00",
                    w.bob_binding.mailbox_id,
                    stamp.day.to_bytes(4, "big"),
                    sealed.digest,
                    bytes([stamp.bits]),
                    stamp.nonce.to_bytes(8, "big"),
                ),
            ),
        ],
    )

    l1_sink = io.BytesIO()
    total = env.seal_outer(
        io.BytesIO(l2),
        len(l2),
        sek_id=vb.sek_id,
        sek_pk=vb.sek_pk,
        mailbox_id=vb.mailbox_id,
        not_after=created + 7 * DAY,
        sink=l1_sink,
        token=token,
        rng=rng,
    )
    l1 = l1_sink.getvalue()
    assert total == len(l1)
    fixed = l1[:64]
    sek = w.bob_server.current()
    l1_shared = x25519(sek.secret, fixed[8:40])
    salt = fixed[8:40] + sek.public
    meta_key = kdf(l1_shared, b"onionpost/v1/server-meta", salt)
    stream_key = kdf(l1_shared, b"onionpost/v1/server-payload", salt)
    meta = aead_decrypt(meta_key, fixed[40:64], l1[64 : 64 + env.META_BYTES + 16], fixed)
    assert meta is not None
    _, plain_len = env._solve_padding(len(l2))
    out["l1"] = "\n".join(
        [
            dump_l1_fixed(fixed).render(full=False),
            dump_meta(meta).render(full=False),
            _kv(
                "bob's inbox opens it",
                [
                    ("shared = X25519(sek, eph_pk)", l1_shared),
                    ("meta key", meta_key),
                    ("stream key", stream_key),
                    ("metadata ciphertext", l1[64 : 64 + env.META_BYTES + 16]),
                    ("secretstream header", l1[158:182]),
                    ("padded plaintext length", plain_len),
                    ("zero padding", plain_len - len(l2)),
                    ("L1 length", len(l1)),
                    ("BLAKE2b-256 of the whole L1", hash32(l1)),
                ],
            ),
        ]
    )
    out.update(enrolment_vectors(w))
    out.update(introduction_vectors(w))
    out.update(login_vectors(w))
    out.update(batch_fetch_vectors())
    return out


def batch_fetch_vectors() -> dict[str, str]:
    """The answer to ``GET /v1/device/messages?ids=7,9`` (§17.3) holding two envelopes
    (stand-ins: the envelopes travel as they are, whatever their bytes)."""
    from onionpost.core.wire import message_frame_head

    one, two = b"L2 envelope seven", b"L2 envelope nine"
    answer = message_frame_head(7, len(one)) + one + message_frame_head(9, len(two)) + two
    return {
        "device-messages": _kv(
            "GET /v1/device/messages?ids=7,9: spool ids 7 and 9, with the envelopes "
            "b'L2 envelope seven' and b'L2 envelope nine'",
            [
                ("frame head of 7", message_frame_head(7, len(one))),
                ("frame head of 9", message_frame_head(9, len(two))),
                ("answer body", answer),
            ],
        ),
        "device-pending-mail": pending_mail_vector(one, two),
        "deliveries": deliveries_vector(),
        "device-submissions": device_submissions_vector(),
    }


def deliveries_vector() -> str:
    """The body of ``POST /v1/deliveries`` (§17.2) with two envelopes (stand-ins again:
    framing does not look inside them)."""
    from onionpost.core.wire import delivery_frame_head, parse_delivery_frames

    one, two = b"L1 envelope one", b"L1 envelope two!"
    body = delivery_frame_head(len(one)) + one + delivery_frame_head(len(two)) + two
    assert parse_delivery_frames(lambda at: body[at : at + 4], len(body)) == [
        (4, len(one)),
        (4 + len(one) + 4, len(two)),
    ]
    return _kv(
        "POST /v1/deliveries: the envelopes b'L1 envelope one' and b'L1 envelope two!'",
        [
            ("frame head of one", delivery_frame_head(len(one))),
            ("frame head of two", delivery_frame_head(len(two))),
            ("request body", body),
        ],
    )


def device_submissions_vector() -> str:
    """The body of ``POST /v1/device/submissions`` (§17.3) with two envelopes for two
    inboxes (stand-ins: framing does not look inside them)."""
    from onionpost.core.wire import (
        HandOverFields,
        delivery_frame_head,
        hand_overs_head,
        parse_hand_overs,
    )

    one, two = b"L1 envelope one", b"L1 envelope two!"
    fields = [
        HandOverFields(
            destination=f"{name}@{'a' * 55}d.onion",
            msg_id=bytes([n]) * 16,
            expires_at=1767830400,
            ref=f"<{n}@example>",
            key=f"s{n}:{name}",
        )
        for n, name in ((1, "bob"), (2, "carol"))
    ]
    head = hand_overs_head(fields)
    body = head + delivery_frame_head(len(one)) + one + delivery_frame_head(len(two)) + two
    parsed = parse_hand_overs(lambda at, n: body[at : at + n], len(body))
    assert parsed == [
        (fields[0], len(head) + 4, len(one)),
        (fields[1], len(head) + 4 + len(one) + 4, len(two)),
    ]
    return _kv(
        "POST /v1/device/submissions: b'L1 envelope one' for bob, b'L1 envelope two!' for carol",
        [
            ("head length", head[:4]),
            ("head (JSON)", head[4:].decode()),
            ("request body", body),
        ],
    )


def pending_mail_vector(one: bytes, two: bytes) -> str:
    """The answer to ``GET /v1/device/pending-mail`` (§17.3) with the same two messages
    pending and room for the first only."""
    import json

    from onionpost.core.wire import first_that_fit, message_frame_head, pending_list_head

    listed = {
        "messages": [
            {"id": 7, "size": len(one), "received_at": 1767225600},
            {"id": 9, "size": len(two), "received_at": 1767225601},
        ],
        "device_list_version": 3,
    }
    text = json.dumps(listed).encode()
    carried = first_that_fit([(7, len(one)), (9, len(two))], 16, 24)
    assert carried == [7]
    answer = pending_list_head(len(text)) + text + message_frame_head(7, len(one)) + one
    return _kv(
        "GET /v1/device/pending-mail?after=0&wait=0&count=16&bytes=24: spool ids 7 and 9 "
        "pending (the envelopes above), device list version 3; 7 fits in 24 bytes, 9 does not",
        [
            ("list head", pending_list_head(len(text))),
            ("answer body", answer),
        ],
    )


def login_vectors(w: World) -> dict[str, str]:
    """alice's laptop logs in to alice's inbox (§17.2), and the empty key update (§17.3); the
    challenge is drawn from a seed of its own so the vectors above stay as they are."""
    from onionpost.core.wire import KeyUpdate
    from onionpost.inbox.postoffice import CTX_LOGIN, login_message

    challenge = SeededRandom(SEED + b"/device-login")(32)
    mailbox_id = w.alice_binding.mailbox_id
    device_id = w.alice_dev.device_id
    signed = login_message(w.alice_server.onion_pk, mailbox_id, device_id, challenge)
    signature = ed25519_sign(w.alice_dev.dsk_seed, signed)
    ed25519_verify(w.alice_dev.dsk_pk, signed, signature, "login")
    return {
        "device-login": "\n".join(
            [
                _kv(
                    "alice's laptop logs in to alice's inbox (keys: §13.2; the challenge is the "
                    "first 32 bytes of SeededRandom(b'onionpost/v1 test vectors/device-login'))",
                    [
                        ("context", CTX_LOGIN),
                        ("onion_pk", w.alice_server.onion_pk),
                        ("mailbox_id", mailbox_id),
                        ("device_id", device_id),
                        ("challenge", challenge),
                        ("signed by the DSK", w.alice_dev.dsk_pk),
                        ("signed bytes", signed),
                        ("signature", signature),
                    ],
                ),
                _kv("the empty key update", [("OPku", KeyUpdate().encode())]),
            ]
        )
    }


def dump_introduction(i: Introduction) -> Dump:
    d = Dump("Introduction", i.encode())
    d.take("magic", 4)
    d.take("introducer_uik", 32)
    d.take("recipient_uik", 32)
    d.take("local var8", 1 + d.data[d.pos])
    d.take("onion_pk", 32)
    d.take("uik_pk", 32)
    d.take("admit_token", 32)
    d.take("present_token", 32)
    d.take("created_at u64", 8)
    d.take("expires_at u64", 8)
    d.take("signature (introducer DSK)", 64)
    return d


def introduction_vectors(w: World) -> dict[str, str]:
    """alice introduces bob to carol (§16), from a seed of its own so the vectors above stay
    as they are."""
    rng = SeededRandom(SEED + b"/introduction")
    carol_id = IdentitySecrets.generate("carol", NOW, rng=rng)
    carol_server = ServerSecrets.generate(NOW, rng=rng)
    token_b, token_c = rng(32), rng(32)
    for_bob, for_carol = introduction_pair(
        introducer_uik=w.alice_id.uik_pk,
        b=("bob", w.bob_server.onion_pk, w.bob_id.uik_pk),
        c=("carol", carol_server.onion_pk, carol_id.uik_pk),
        token_b=token_b,
        token_c=token_c,
        created_at=NOW,
        expires_at=NOW + 14 * DAY,
        dsk_seed=w.alice_dev.dsk_seed,
    )
    # checked from bob's side, as a receiver would
    assert (
        open_introduction(
            for_bob.encode(),
            dsk_pk=w.alice_dev.dsk_pk,
            sender_uik=w.alice_id.uik_pk,
            reader_uik=w.bob_id.uik_pk,
            now=NOW,
        )
        == for_bob
    )
    inputs = _kv(
        "alice introduces bob to carol (alice's DSK, bob's keys: §13.2; carol's drawn from "
        "SeededRandom(b'onionpost/v1 test vectors/introduction'), in this order)",
        [
            ("carol UIK seed", carol_id.uik_seed),
            ("carol UIK", carol_id.uik_pk),
            ("carol onion seed", carol_server.onion_seed),
            ("carol onion_pk", carol_server.onion_pk),
            ("token_b (carol presents it at bob's inbox)", token_b),
            ("token_c (bob presents it at carol's inbox)", token_c),
            ("signed by alice's DSK", w.alice_dev.dsk_pk),
            ("signature context", CTX_INTRODUCTION),
            ("signed bytes", "context || every field before the signature"),
            ("carol's fingerprint (shown to bob)", fingerprint(carol_id.uik_pk)),
        ],
    )
    return {
        "introduction": "\n".join(
            [
                inputs,
                dump_introduction(for_bob).render(),
                dump_introduction(for_carol).render(full=False),
            ]
        )
    }


def enrolment_vectors(w: World) -> dict[str, str]:
    """Invite and pairing codes and a pairing exchange (§15), from their own seed so the
    message vectors above stay as they are."""
    from onionpost.core.pairing import Code, Joiner, JoinGrant, JoinRequest, Offer

    rng = SeededRandom(SEED + b"/enrolment")
    onion_pk = w.bob_server.onion_pk
    invite = Code.generate("invite", onion_pk, rng=rng)
    pairing = Code.generate("pairing", onion_pk, rng=rng)
    out = {
        "codes": "\n".join(
            [
                _kv(
                    "an invite code for bob's inbox",
                    [
                        ("secret", invite.secret),
                        ("text", invite.text()),
                        ("QR payload", invite.qr_payload()),
                        ("claim", invite.claim()),
                        ("stored by the inbox: H(claim)", hash32(invite.claim())),
                    ],
                ),
                _kv(
                    "a pairing code for the same inbox",
                    [
                        ("secret", pairing.secret),
                        ("text", pairing.text()),
                        ("slot", pairing.slot()),
                    ],
                ),
            ]
        )
    }
    offer = Offer.create(pairing, rng=rng)
    joiner = Joiner.create(pairing, offer.public, rng=rng)
    new_dev = DeviceSecrets.generate("tablet", NOW, rng=rng)
    request = JoinRequest(
        new_dev.device_id, new_dev.dsk_pk, "tablet", new_dev.signed_prekey(), True
    )
    sealed_request = joiner.seal_request(request, rng=rng)
    assert offer.open_request(joiner.public, sealed_request) == request
    shared = x25519(offer.secret_key, joiner.public)
    tx = pairing.slot() + offer.public + joiner.public
    grant = JoinGrant(
        "bob",
        w.bob_binding.mailbox_id,
        bytes(32),
        w.bob_binding,
        w.bob_dl,
        w.bob_id.uik_seed,
        w.bob_id.created_at,
    )
    sealed_grant = offer.seal_grant(joiner.public, grant, rng=rng)
    assert joiner.open_grant(sealed_grant) == grant
    out["pairing"] = _kv(
        "a pairing exchange (the existing device offers, the new device joins)",
        [
            ("offer secret (ephemeral)", offer.secret_key),
            ("offer public", offer.public),
            ("join secret (ephemeral)", joiner.secret_key),
            ("join public", joiner.public),
            ("shared = X25519", shared),
            ("transcript = slot || offer || join", tx),
            ("join key", kdf(pairing.secret, b"onionpost/v1/pair-join", shared + tx)),
            ("grant key", kdf(pairing.secret, b"onionpost/v1/pair-grant", shared + tx)),
            ("JoinRequest encoding", request.encode()),
            ("sealed request (nonce || AEAD)", sealed_request),
            ("BLAKE2b-256 of the JoinGrant encoding", hash32(grant.encode())),
            ("BLAKE2b-256 of the sealed grant", hash32(sealed_grant)),
        ],
    )
    return out


# --- the document ------------------------------------------------------------------------------

_BLOCK = re.compile(
    r"(<!-- vectors:begin (?P<name>[a-z0-9-]+) -->\n)"
    r"```text\n(?P<body>.*?)```\n"
    r"(<!-- vectors:end (?P=name) -->)",
    re.DOTALL,
)


def read_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"].rstrip("\n") for m in _BLOCK.finditer(text)}


def write_blocks(text: str, blocks: dict[str, str]) -> str:
    missing = set(blocks) - set(read_blocks(text))
    if missing:
        raise SystemExit(f"docs/protocol.md has no block for: {', '.join(sorted(missing))}")

    def repl(m: re.Match[str]) -> str:
        return f"{m[1]}```text\n{blocks[m['name']]}\n```\n{m[4]}"

    return _BLOCK.sub(repl, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--write", action="store_true", help="rewrite the blocks in docs/protocol.md")
    args = ap.parse_args(argv)
    blocks = generate()
    if args.write:
        DOC.write_text(write_blocks(DOC.read_text(encoding="utf-8"), blocks), encoding="utf-8")
        print(f"rewrote {len(blocks)} vector blocks in {DOC}")
        return 0
    for name, body in blocks.items():
        print(f"== {name}\n{body}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
