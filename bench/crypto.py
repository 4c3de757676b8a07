"""Envelope throughput, per-device cost, peak memory and proof of work, against raw libsodium.

The references are the primitives the envelope is built from, run on the same bytes in the
same process a moment earlier: secretstream push/pull in 64 KiB chunks and one-shot
XChaCha20-Poly1305 (both through ``onionpost.core.crypto.primitives``, a thin wrapper over
libsodium, so only one module imports it), one X25519 scalar multiplication, and one BLAKE2b
stamp hash.  A full seal runs the body through secretstream twice (L2 and L1) and BLAKE2b
twice (body hash, L2 digest), so about 3x over one secretstream pass is the floor to expect
for large messages.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from bench.harness import (
    Context,
    Stats,
    fmt_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from onionpost.base.config import InboxConfig
from onionpost.base.hashing import BACKGROUND_MIN, hasher_in_background
from onionpost.core.crypto import envelope as env
from onionpost.core.crypto import pow as stamps
from onionpost.core.crypto.envelope import (
    CHUNK,
    HasherFactory,
    SenderKeys,
    StanzaTarget,
    open_inner,
    open_outer,
    seal_inner,
    seal_outer,
)
from onionpost.core.crypto.keys import DeviceSecrets, IdentitySecrets, ServerSecrets
from onionpost.core.crypto.primitives import (
    StreamOpener,
    StreamSealer,
    aead_decrypt,
    aead_encrypt,
    ed25519_keypair,
    ed25519_public,
    ed25519_sign,
    ed25519_sign_expanded,
    ed25519_verify,
    hash32,
    hasher,
    kdf,
    mac32,
    system_random,
    x25519,
    x25519_public,
)

KiB = 1 << 10
MiB = 1 << 20
NOW = 1_700_000_000
DAY = 86_400


class _Discard:
    """A sink that keeps nothing (so a measurement does not include storing the output)."""

    def write(self, b: bytes, /) -> int:
        return len(b)


class _NoReplay:
    def seen(self, msg_id: bytes) -> bool:
        return False


@dataclass
class _World:
    """One sender device, one recipient with one device and an inbox."""

    sender: SenderKeys
    uik: bytes
    device: DeviceSecrets
    server: ServerSecrets
    mailbox: bytes
    _public: dict[bytes, bytes] = field(default_factory=dict)  # secret -> public
    #: As the node seals and opens: a large message's hashes beside the cipher.
    hashers: HasherFactory = hasher_in_background

    @classmethod
    def make(cls) -> _World:
        alice = IdentitySecrets.generate("alice", NOW)
        alice_dev = DeviceSecrets.generate("alice", NOW)
        bob = IdentitySecrets.generate("bob", NOW)
        return cls(
            SenderKeys(
                "alice",
                ServerSecrets.generate(NOW).onion_pk,
                alice.uik_pk,
                alice_dev.device_id,
                0,
                alice_dev.dsk_seed,
            ),
            bob.uik_pk,
            DeviceSecrets.generate("bob", NOW),
            ServerSecrets.generate(NOW),
            os.urandom(16),
        )

    @property
    def target(self) -> StanzaTarget:
        """The recipient device's prekey, derived once (a sender has it from the bundle)."""
        p = self.device.current_prekey()
        cached = self._public.get(p.secret)
        if cached is None:
            cached = self._public[p.secret] = x25519_public(p.secret)
        return StanzaTarget(p.spk_id, cached)

    @property
    def sek_public(self) -> bytes:
        """The inbox's current SEK public key, derived once (a sender has it from the bundle)."""
        sek = self.server.current()
        cached = self._public.get(sek.secret)
        if cached is None:
            cached = self._public[sek.secret] = sek.public
        return cached

    def seal_l2(
        self, body: bytes, sink: IO[bytes] | io.BytesIO, targets: list[StanzaTarget] | None = None
    ) -> int:
        return seal_inner(
            sender=self.sender,
            targets=targets or [self.target],
            recipient_uiks=[self.uik],
            body=body,
            created_at=NOW,
            expires_at=NOW + DAY,
            sink=sink,
            hashers=self.hashers,
            with_digest=False,  # as the node seals: the digest only for a stamp (seal_l1's token)
        ).length

    def seal_l1(self, l2: IO[bytes] | io.BytesIO, l2_len: int, sink: object) -> int:
        sek = self.server.current()
        return seal_outer(
            l2,
            l2_len,
            sek_id=sek.sek_id,
            sek_pk=self.sek_public,
            mailbox_id=self.mailbox,
            not_after=NOW + DAY,
            sink=sink,  # type: ignore[arg-type]
            token=bytes(32),
        )

    def open_l1(self, source: IO[bytes] | io.BytesIO, length: int, sink: object) -> int:
        meta = open_outer(
            source,
            length,
            server_key=lambda i: (self.server.current().secret, self.sek_public),
            now=NOW,
            max_l2_bytes=1 << 30,
            l2_sink=sink,  # type: ignore[arg-type]
            hashers=self.hashers,
        )
        return meta.l2_len

    def open_l2(self, source: IO[bytes] | io.BytesIO, length: int, sink: object) -> None:
        open_inner(
            source,
            length,
            prekeys=[(p.spk_id, p.secret, p.public) for p in self.device.prekeys],
            reader_uik=self.uik,
            now=NOW,
            seen=_NoReplay(),
            sink=sink,  # type: ignore[arg-type]
            hashers=self.hashers,
        )


def run(ctx: Context) -> None:
    w = _World.make()
    _throughput(ctx, w)
    _breakdown(ctx, w)
    _per_device(ctx, w)
    _memory(ctx, w)
    _proof_of_work(ctx)


# --- throughput -------------------------------------------------------------------------------


def _seal_all(w: _World, body: bytes) -> bytes:
    l2 = io.BytesIO()
    n = w.seal_l2(body, l2)
    l2.seek(0)
    l1 = io.BytesIO()
    w.seal_l1(l2, n, l1)
    return l1.getvalue()


def _open_all(w: _World, l1: bytes) -> None:
    l2 = io.BytesIO()
    n = w.open_l1(io.BytesIO(l1), len(l1), l2)
    l2.seek(0)
    w.open_l2(l2, n, _Discard())


def _stream_push(key: bytes, body: bytes) -> list[bytes]:
    sealer = StreamSealer(key, bytes(24))
    view = memoryview(body)
    last = max(0, (len(body) - 1) // CHUNK)
    return [
        sealer.seal(view[i * CHUNK : (i + 1) * CHUNK].tobytes(), final=i == last)
        for i in range(last + 1)
    ]


def _stream_pull(key: bytes, chunks: list[bytes]) -> None:
    opener = StreamOpener(key, bytes(24))
    for c in chunks:
        opener.open(c)


def _throughput(ctx: Context, w: _World) -> None:
    ctx.heading(
        "envelope seal (L3 sign -> L2 -> L1, in memory) and open (L1 -> L2 -> verify), "
        "1 recipient device; medians"
    )
    sizes = [(KiB, 50), (MiB, 5)] if ctx.quick else [(KiB, 300), (MiB, 20), (50 * MiB, 3)]
    for size, repeat in sizes:
        _throughput_at(ctx, w, size, repeat)


def _throughput_at(ctx: Context, w: _World, size: int, repeat: int) -> None:
    key, nonce = os.urandom(32), os.urandom(24)
    body = os.urandom(size)
    label = fmt_bytes(size)
    # A few outputs of the size held while timing: glibc then serves each new one from memory
    # already mapped.  Without them, the first rows here (the raw AEAD) took fresh pages on
    # every call, twice as slow at 1 MiB (1.5 against 0.75 ms), which made every envelope
    # row look twice as good against them as it is.
    held = [aead_encrypt(key, nonce, body, b"") for _ in range(4)]

    def measure(name: str, fn: Callable[[], object]) -> Stats:
        return ctx.measure(f"{name} {label}", fn, repeat=repeat, size=size)

    push = measure("secretstream push", lambda: _stream_push(key, body))
    chunks = _stream_push(key, body)
    pull = measure("secretstream pull", lambda: _stream_pull(key, chunks))
    ct = aead_encrypt(key, nonce, body, b"")
    enc = measure("AEAD encrypt", lambda: aead_encrypt(key, nonce, body, b""))
    dec = measure("AEAD decrypt", lambda: aead_decrypt(key, nonce, ct, b""))
    seal = measure("envelope seal", lambda: _seal_all(w, body))
    l1 = _seal_all(w, body)
    opened = measure("envelope open", lambda: _open_all(w, l1))
    ctx.compare(seal, push, extra=f"L1 is {fmt_bytes(len(l1))}")
    ctx.compare(seal, enc)
    ctx.compare(opened, pull)
    ctx.compare(opened, dec)
    if size >= BACKGROUND_MIN:
        # The same seal and open with every hash in line: what the hashing thread saves.
        in_line = dataclasses.replace(w, hashers=hasher)
        seal_1 = measure("envelope seal, hashes in line,", lambda: _seal_all(in_line, body))
        open_1 = measure("envelope open, hashes in line,", lambda: _open_all(in_line, l1))
        ctx.compare(seal, seal_1, extra="hashes beside the cipher vs in line")
        ctx.compare(opened, open_1, extra="hashes beside the cipher vs in line")
    del held


# --- fixed costs -------------------------------------------------------------------------------


def _breakdown(ctx: Context, w: _World) -> None:
    """The steps of a 1 KiB seal and open, each timed alone with the helpers the envelope uses.

    The steps do not add up exactly to the whole (the whole also parses, writes to its sinks
    and allocates), but they say where the fixed cost of a small message goes."""
    ctx.heading("envelope fixed costs: the steps of a 1 KiB seal and open (1 device), medians")
    repeat, number = (10, 20) if ctx.quick else (30, 100)
    body = os.urandom(KiB)
    key, nonce = os.urandom(32), os.urandom(24)
    ref = ctx.measure(
        "AEAD encrypt 1.0 KiB", lambda: aead_encrypt(key, nonce, body, b""), repeat=30, number=500
    )
    target, sek_pk = w.target, w.sek_public
    seed = w.sender.dsk_seed
    l2_len = 1400  # a 1 KiB body's L2 with one recipient
    total, plain_len = env._solve_padding(l2_len)
    l2_plain = os.urandom(l2_len)
    secret = w.server.current().secret
    eph_pk = x25519_public(os.urandom(32))
    message = env.CTX_CONTENT + os.urandom(300) + hash32(body)
    dsk_pk, signature = ed25519_public(seed), ed25519_sign(seed, message)
    l2_header = env._l2_header(key, [target], system_random)
    prekeys = [(p.spk_id, p.secret, p.public) for p in w.device.prekeys]
    n_stanzas = (len(l2_header) - 7 - 32) // env.STANZA_BYTES
    padded = l2_plain + bytes(plain_len - l2_len)

    def kdfs() -> None:
        shared = key
        salt = eph_pk + sek_pk
        env._stanza_key(shared, eph_pk, target.spk_pk)
        mac32(kdf(shared, env.CTX_HEADER), l2_header[:-32])
        kdf(shared, env.CTX_PAYLOAD)
        kdf(shared, env.CTX_SERVER_META, salt)
        kdf(shared, env.CTX_SERVER_PAYLOAD, salt)

    def hashes() -> None:
        hash32(body)
        hash32(l2_header)
        env.recipients_hash([w.uik])
        hash32(l2_header, l2_plain)  # the L2 digest

    def pad() -> None:
        env._solve_padding(l2_len)
        for _ in env._read_then_pad(io.BytesIO(l2_plain), l2_len, plain_len - l2_len):
            pass

    def streams() -> None:
        sealer = StreamSealer(key, nonce)
        sealer.seal(body + bytes(400), final=True)  # L2: the L3 (header, body, signature)
        aead_encrypt(key, nonce, bytes(env.META_BYTES), bytes(env.L1_FIXED))
        for _ in env._stream_seal(StreamSealer(key, nonce), [padded], plain_len, _Discard()):
            pass

    l1_chunks = list(env._stream_seal(StreamSealer(key, nonce), [padded], plain_len, _Discard()))

    def pull() -> None:
        opener = StreamOpener(key, nonce)
        for c in l1_chunks:
            opener.open(c)

    def zero_check() -> None:
        env._check_zeros(padded, l2_len)

    seal_steps: list[tuple[str, Callable[[], object]]] = [
        ("KDFs (5 + header MAC)", kdfs),
        (f"stanzas ({n_stanzas}, 1 real)", lambda: env._l2_header(key, [target], system_random)),
        (
            "signature (key + sign)",
            lambda: ed25519_sign_expanded(ed25519_keypair(seed)[1], message),
        ),
        ("L1 key agreement", lambda: x25519(os.urandom(32), sek_pk) + x25519_public(key)),
        ("padding (bucket + zeros)", pad),
        ("hashes (body, L2 header, L2)", hashes),
        ("AEAD + secretstream", streams),
    ]
    open_steps: list[tuple[str, Callable[[], object]]] = [
        ("stanza unwrap", lambda: env._unwrap_file_key(l2_header[7:-32], n_stanzas, prekeys)),
        ("signature verify", lambda: ed25519_verify(dsk_pk, message, signature, "bench")),
        ("L1 key agreement (1 DH)", lambda: x25519(secret, eph_pk)),
        ("padding check (zeros)", zero_check),
        ("secretstream pull 16 KiB", pull),
    ]

    def seal_floor() -> None:
        for _ in range(n_stanzas + 1):  # the stanzas' and the L1's ephemeral keys
            x25519_public(key)
        x25519(key, sek_pk)  # the real stanza's DH
        x25519(key, sek_pk)  # the L1's DH
        ed25519_sign_expanded(ed25519_keypair(seed)[1], message)

    def open_floor() -> None:
        x25519(secret, eph_pk)
        x25519(secret, eph_pk)
        ed25519_verify(dsk_pk, message, signature, "bench")

    seal_steps.append(("floor: public-key ops only", seal_floor))
    open_steps.append(("floor: public-key ops only", open_floor))
    for side, steps in (("seal", seal_steps), ("open", open_steps)):
        for name, fn in steps:
            stats = ctx.measure(f"{side}: {name}", fn, repeat=repeat, number=number)
            ctx.compare(stats, ref)
    ctx.note(
        f"A 1 KiB body fills a {fmt_bytes(total)} L1 (the padding floor); the reference is one "
        "XChaCha20-Poly1305 of the body."
    )
    ctx.note(
        f"floor: the X25519 and Ed25519 operations the format requires ({n_stanzas + 1} "
        "base-point mults, 2 DH, key + sign to seal; 2 DH + verify to open, public keys "
        "cached): no implementation of this format goes below it."
    )


# --- per device -------------------------------------------------------------------------------


def _per_device(ctx: Context, w: _World) -> None:
    ctx.heading("cost per recipient device (seal_inner of 1 KiB; one stanza per device)")
    dh_pk = x25519_public(os.urandom(32))
    dh_sk = os.urandom(32)
    dh = ctx.measure("one X25519 (scalarmult)", lambda: x25519(dh_sk, dh_pk), repeat=30, number=100)
    body = os.urandom(KiB)
    targets = [StanzaTarget(i, x25519_public(os.urandom(32))) for i in range(64)]
    repeat = 10 if ctx.quick else 60
    results: dict[int, Stats] = {}
    for n in (1, 8, 64):
        results[n] = ctx.measure(
            f"seal_inner, {n} device{'s' if n > 1 else ''}",
            lambda n=n: w.seal_l2(body, io.BytesIO(), targets[:n]),  # type: ignore[misc]
            repeat=repeat,
        )
        ctx.compare(results[n], dh)
    per = (results[64].p50 - results[1].p50) / 63
    per_stats = Stats("per extra device ((t64-t1)/63)", (per,))
    ctx.compare(per_stats, dh, extra="(a stanza: X25519 base-point mult + X25519 DH + KDF + AEAD)")


# --- memory -----------------------------------------------------------------------------------

MEMORY_CASES = {
    "seal-files": "seal, streamed through files",
    "open-files": "open, streamed through files",
    "seal-memory": "seal, L2 and L1 in BytesIO",
}


def _memory(ctx: Context, w: _World) -> None:
    """Each case runs in a fresh interpreter: in this one, the throughput runs left freed
    arenas behind that would hide any growth of the resident set."""
    size = 8 * MiB if ctx.quick else 50 * MiB
    ctx.heading(
        f"peak memory for a {fmt_bytes(size)} message, beyond the caller's copy of the body "
        "(fresh process per case; ratio = peak / message size)"
    )
    with tempfile.TemporaryDirectory(prefix="onionpost-bench-") as d:
        _prepare_open_case(w, size, d)
        for case, name in MEMORY_CASES.items():
            peak = _child(case, size, d, "tracemalloc")
            rss = _child(case, size, d, "rss")
            rss_text = f"RSS +{fmt_bytes(rss)} ({rss / size:.2f}x)" if rss >= 0 else "RSS n/a"
            ctx.figure(
                name,
                f"tracemalloc {fmt_bytes(peak)}",
                extra=f"{peak / size:.3f}x message   {rss_text}",
            )
    ctx.note(
        "Streamed, a message costs a few 64 KiB chunks beyond the caller's body; held in "
        "BytesIO it costs the L2 and L1 copies."
    )


def _prepare_open_case(w: _World, size: int, workdir: str) -> None:
    """The L1 that the open case reads, and the recipient device key that opens it."""
    Path(workdir, "device.key").write_bytes(w.device.encode())
    Path(workdir, "server.key").write_bytes(w.server.encode())
    Path(workdir, "reader.uik").write_bytes(w.uik)
    with tempfile.TemporaryFile(dir=workdir) as l2:
        n = w.seal_l2(os.urandom(size), l2)
        l2.seek(0)
        with Path(workdir, "open.l1").open("wb") as l1:
            w.seal_l1(l2, n, l1)


def _child(case: str, size: int, workdir: str, how: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "bench.crypto", "--memory", case, str(size), workdir, how],
        cwd=Path(__file__).resolve().parents[1],
        check=False,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory case {case} ({how}) failed:\n{out.stderr}")
    return int(json.loads(out.stdout)["bytes"])


def _memory_child(case: str, size: int, workdir: str, how: str) -> int:
    """Run one case and return its peak (tracemalloc) or its RSS high-water growth."""
    w = _World.make()
    if case == "open-files":
        w.device = DeviceSecrets.parse(Path(workdir, "device.key").read_bytes())
        w.server = ServerSecrets.parse(Path(workdir, "server.key").read_bytes())
        w.uik = Path(workdir, "reader.uik").read_bytes()
    body = b"" if case == "open-files" else os.urandom(size)
    l1_path = Path(workdir, "open.l1")

    def seal_to_files() -> None:
        with tempfile.TemporaryFile(dir=workdir) as l2:
            n = w.seal_l2(body, l2)
            l2.seek(0)
            with tempfile.TemporaryFile(dir=workdir) as l1:
                w.seal_l1(l2, n, l1)

    def open_from_files() -> None:
        with l1_path.open("rb") as l1, tempfile.TemporaryFile(dir=workdir) as l2:
            n = w.open_l1(l1, l1_path.stat().st_size, l2)
            l2.seek(0)
            with tempfile.TemporaryFile(dir=workdir) as out:
                w.open_l2(l2, n, out)

    fn: Callable[[], object] = {
        "seal-files": seal_to_files,
        "open-files": open_from_files,
        "seal-memory": lambda: _seal_all(w, body),
    }[case]
    gc.collect()
    if how == "tracemalloc":
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak
    before = rss_bytes()
    if before is None or not reset_peak_rss():
        return -1
    fn()
    after = peak_rss_bytes()
    return -1 if after is None else after - before


# --- proof of work --------------------------------------------------------------------------------


def _proof_of_work(ctx: Context) -> None:
    default_bits = InboxConfig().pow_bits
    bits = 12 if ctx.quick else default_bits
    mints = 3 if ctx.quick else 12
    ctx.heading(
        f"proof-of-work stamp, {bits} bits"
        + (f" (quick run; the default is {default_bits})" if ctx.quick else " (the inbox default)")
    )
    mailbox = os.urandom(16)
    stamp_input = b"onionpost/v1/pow\x00" + mailbox + bytes(4) + os.urandom(32) + b"\x13" + bytes(8)
    one_hash = ctx.measure(
        f"one BLAKE2b-256 ({len(stamp_input)} B)",
        lambda: hashlib.blake2b(stamp_input, digest_size=32).digest(),
        repeat=30,
        number=2000,
    )
    expected = Stats(
        f"2^{bits} x one BLAKE2b-256", tuple(s * (1 << bits) for s in one_hash.samples)
    )
    hashes = [system_random(32) for _ in range(mints + 1)]
    it = iter(hashes)
    minted = ctx.measure(
        "mint", lambda: stamps.mint(mailbox, next(it), bits, NOW), repeat=mints, warmup=1
    )
    ctx.distribution(
        minted, expected, extra="(mint cost is exponential: p50 ~ 0.7x mean, p95 ~ 3x mean)"
    )
    s = stamps.mint(mailbox, hashes[0], bits, NOW)
    verify = ctx.measure(
        "verify", lambda: stamps.verify(s, mailbox, hashes[0], bits, NOW), repeat=30, number=500
    )
    ctx.compare(verify, one_hash)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--memory":
        result = _memory_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
        print(json.dumps({"bytes": result}))
    else:
        sys.exit("usage: python -m bench.crypto --memory CASE SIZE WORKDIR tracemalloc|rss")
