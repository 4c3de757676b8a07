"""The inbox role: what the post office decides, independent of HTTP.

It accepts sealed mail for its mailboxes (unwrap the outer layer, check anti-spam proof and
limits, route to the devices whose keys the sender used, store durably), serves signed key
bundles, runs device sessions (challenge-response login, fetch, acknowledge), takes
submissions into the outbox and installs newly published keys.  It holds only ciphertext.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, TypeVar

from onionpost.base.config import InboxConfig
from onionpost.base.hashing import hasher_in_background
from onionpost.core import quota
from onionpost.core.address import Address, is_local_part
from onionpost.core.crypto import envelope, pow
from onionpost.core.crypto.bundle import AntiSpamPolicy, KeyBundle
from onionpost.core.crypto.keys import (
    DeviceList,
    Profile,
    RotationRecord,
    ServerBinding,
    ServerSecrets,
    SignedPrekey,
    verify_chain,
)
from onionpost.core.crypto.primitives import (
    RandomSource,
    ed25519_verify,
    hash32,
    kdf,
    mac32,
    system_random,
)
from onionpost.core.errors import (
    BadSignature,
    CryptoError,
    DeviceRefused,
    DiskFull,
    MalformedData,
    MessageTooLarge,
    PermanentDeliveryError,
    ProofOfWorkError,
    QuotaExceeded,
    StaleRecipientKeys,
    StoreError,
    TemporaryDeliveryError,
    UnknownMailbox,
)
from onionpost.core.wire import KeyUpdate
from onionpost.store.db import Database
from onionpost.store.disk import DiskRoom
from onionpost.store.inbox import InboxStore, MailboxRow, RateBucket, SpoolEntry
from onionpost.store.outbox import OutboxStore

R = TypeVar("R")

CTX_LOGIN = b"onionpost/v1/device-login\x00"
CTX_TOKEN_HASH = b"onionpost/v1/token-hash"
CHALLENGE_SECONDS = 120
SESSION_SECONDS = 3600
HOUR = 3600
MAX_SUBMIT_LIFETIME = 30 * 86_400
SPOOL_IN_MEMORY = 1 << 20

#: The refusal of a contact token that is withdrawn or was never issued (protocol §8.1).
TOKEN_REFUSED = "The recipient's inbox does not accept this message's contact token."  # noqa: S105 (a sentence, not a secret)
#: The refusal of a stranger's mail by a contacts-only mailbox (protocol §8.1).
CONTACTS_ONLY = (
    "This person accepts mail from contacts only; ask someone they know to introduce you."
)


def login_message(onion_pk: bytes, mailbox_id: bytes, device_id: bytes, challenge: bytes) -> bytes:
    """What a device signs to log in to its inbox (bound to this inbox and this challenge)."""
    return CTX_LOGIN + onion_pk + mailbox_id + device_id + challenge


@dataclass(frozen=True)
class DeliveryResult:
    receipt: str
    duplicate: bool
    mailbox_id: bytes
    device_ids: frozenset[bytes]
    missing_devices: int


@dataclass
class Unwrapped:
    """An envelope whose outer layer opened: its metadata and the L2 in a temporary file."""

    meta: envelope.OuterMeta
    l2: IO[bytes]
    spk_ids: set[int]

    def __enter__(self) -> Unwrapped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.l2.close()


@dataclass(frozen=True)
class HandOver:
    """A sealed envelope a device hands to its inbox for delivery (``POST
    /v1/device/submit``)."""

    session: Session
    destination: str
    sealed: bytes | tuple[envelope.Readable, int]
    msg_id: bytes
    expires_at: int
    message_ref: str
    submission_key: str
    now: int


@dataclass(frozen=True)
class Session:
    mailbox_id: bytes
    device_id: bytes


class Inbox:
    def __init__(
        self,
        *,
        store: InboxStore,
        outbox: OutboxStore,
        secrets: ServerSecrets,
        config: InboxConfig,
        rng: RandomSource = system_random,
        room: DiskRoom | None = None,
    ) -> None:
        self.store = store
        #: Refuses deliveries while the disk is nearly full (None: never asks).
        self.room = room
        self.outbox = outbox
        self.secrets = secrets
        self.config = config
        self.rng = rng
        self._token_key = kdf(secrets.onion_seed, CTX_TOKEN_HASH)
        #: local -> (valid until, the mailbox row it was built from, the bundle).
        self._bundle_cache: dict[str, tuple[int, MailboxRow, bytes]] = {}
        #: Called with (mailbox id, device ids) after new mail was spooled for devices.
        self.on_spooled: list[Callable[[bytes, frozenset[bytes]], None]] = []

    @property
    def onion_pk(self) -> bytes:
        return self.secrets.onion_pk

    # -- key bundles ----------------------------------------------------------------------

    def bundle(self, local: str, now: int) -> bytes:
        """The signed key bundle of a mailbox; :class:`UnknownMailbox` if there is none."""
        mb = self.store.mailbox_by_local(local)
        if mb is None or mb.device_list_version == 0:
            # The name is repeated only when it is a valid one: the answer must not carry
            # arbitrary bytes from the request back (a path can be 8 KiB of anything).
            name = local.lower()
            if is_local_part(name):
                raise UnknownMailbox(f"This inbox has no mailbox named '{name}'.")
            raise UnknownMailbox()
        cached = self._bundle_cache.get(mb.local)
        # The row is compared too: the CLI changes it beside a running node (`contacts
        # policy` straight in the database), and senders must see the policy at once.
        if cached is not None and cached[0] > now and cached[1] == mb:
            return cached[2]
        chains = {
            device_id: tuple(RotationRecord.parse(r) for r in records)
            for device_id, records in self.store.rotations(mb.mailbox_id).items()
        }
        bundle = KeyBundle(
            local=mb.local,
            binding=ServerBinding.parse(mb.binding),
            device_list=DeviceList.parse(mb.device_list),
            chains=chains,
            prekeys=tuple(
                SignedPrekey.parse(p) for p in self.store.current_prekeys(mb.mailbox_id, now)
            ),
            policy=self.policy(mb.accepts_strangers, mb.pow_bits),
            profile=Profile.parse(mb.profile) if mb.profile else None,
        ).encode()
        self._bundle_cache[mb.local] = (now + 60, mb, bundle)
        return bundle

    def policy(self, accepts_strangers: bool, pow_bits: int | None) -> AntiSpamPolicy:
        return AntiSpamPolicy(
            pow_bits=self.config.pow_bits if pow_bits is None else pow_bits,
            accepts_strangers=accepts_strangers,
            max_envelope_bytes=self.config.max_envelope_bytes,
        )

    def set_accepts_strangers(self, mailbox_id: bytes, accepts: bool) -> None:
        """Open the mailbox to strangers (with a proof of work) or make it contacts-only;
        the difficulty and the quota stay as they are."""
        mb = self.store.mailbox(mailbox_id)
        if mb is None:
            raise UnknownMailbox()
        self.store.set_policy(
            mailbox_id,
            accepts_strangers=accepts,
            pow_bits=mb.pow_bits,
            quota_bytes=mb.quota_bytes,
        )
        self._bundle_cache.pop(mb.local, None)

    def withdraw_token(self, mailbox_id: bytes, token: bytes, now: int) -> bool:
        """Withdraw a contact token: mail carrying it is refused from now on (permanently,
        with :data:`TOKEN_REFUSED`).  Registering the same token again restores it; a device
        that blocked someone never does (it draws a fresh token for them after unblocking,
        and only when the person writes to them)."""
        return self.store.revoke_token(mailbox_id, self.token_hash(token), now)

    def _forget_bundle(self, mailbox_id: bytes) -> None:
        mb = self.store.mailbox(mailbox_id)
        if mb is not None:
            self._bundle_cache.pop(mb.local, None)

    # -- deliveries -----------------------------------------------------------------------

    def token_hash(self, token: bytes) -> bytes:
        return mac32(self._token_key, token)

    def deliver(self, source: envelope.Readable, length: int, *, now: int) -> DeliveryResult:
        """Accept one L1 envelope read from ``source``; durable when this returns."""
        with self.unwrap(source, length, now=now) as unwrapped:
            return self.accept(unwrapped, now=now)

    def unwrap(self, source: envelope.Readable, length: int, *, now: int) -> Unwrapped:
        """Open the outer layer into a temporary file.  Touches no database, so the server
        runs it in a worker thread (a 50 MiB envelope takes a noticeable fraction of a second).

        Raises :class:`PermanentDeliveryError` for anything that will never be accepted.
        """
        if length > self.config.max_envelope_bytes + (1 << 20):
            raise PermanentDeliveryError.from_error(
                MessageTooLarge(
                    f"The envelope is {length} bytes; this inbox accepts at most "
                    f"{self.config.max_envelope_bytes}."
                )
            )
        l2 = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # noqa: SIM115
        try:
            meta = envelope.open_outer(
                source,
                length,
                server_key=self._server_secret,
                now=now,
                max_l2_bytes=self.config.max_envelope_bytes,
                l2_sink=l2,
                hashers=hasher_in_background,
            )
            l2.seek(0)
            spk_ids = _stanza_prekey_ids(l2)
        except CryptoError as exc:
            l2.close()
            raise PermanentDeliveryError.from_error(exc) from exc
        except BaseException:
            l2.close()
            raise
        return Unwrapped(meta, l2, spk_ids)

    def accept(self, unwrapped: Unwrapped, *, now: int, durable: bool = True) -> DeliveryResult:
        """Check proof, routing and limits, then store durably; raises delivery errors.

        The order matters for abuse resistance: the token or stamp is checked *before* any
        counter is charged, so an envelope without a valid proof is refused without writing
        anything (it costs the sender a connection and an upload, and the owner nothing).
        Duplicates and envelopes no current device can read are answered before charging
        too; only an envelope that is about to be stored counts against the limits.

        ``durable=False`` is for this node's own outbox only (see
        :meth:`Database.transaction`): its delivered mark is committed to the same database
        file after this, durably, so the mark is never on disk without the delivery.
        """
        result = self._accept(unwrapped, now=now, durable=durable)
        self._spooled(result)
        return result

    def _spooled(self, result: DeliveryResult) -> None:
        """Tell the listeners (the devices' long polls) of a committed delivery."""
        if result.device_ids:
            for listener in self.on_spooled:
                listener(result.mailbox_id, result.device_ids)

    def _accept(self, unwrapped: Unwrapped, *, now: int, durable: bool = True) -> DeliveryResult:
        """:meth:`accept` without telling the listeners (the caller does, after its commit)."""
        meta = unwrapped.meta
        mb = self.store.mailbox(meta.mailbox_id)
        if mb is None:
            raise UnknownMailbox()
        buckets = self._check_proof(meta, mb.mailbox_id, mb.accepts_strangers, mb.pow_bits, now)
        # Derived, not stored: a redelivery gets the same receipt.
        receipt = hash32(b"onionpost/v1/receipt", mb.mailbox_id, meta.l2_digest)[:12].hex()
        if self.store.seen(mb.mailbox_id, meta.l2_digest):
            return DeliveryResult(receipt, True, mb.mailbox_id, frozenset(), 0)
        room = self.room
        if room is not None and room.short_by(meta.l2_len, refusing="a delivery") is not None:
            # The sender hears only that it must retry, not how full this disk is.
            raise TemporaryDeliveryError.from_error(
                DiskFull("The recipient's inbox is short of disk space; delivery will be retried.")
            )
        targets = self.store.devices_for_prekeys(mb.mailbox_id, unwrapped.spk_ids)
        active = {d.device_id for d in self.store.devices(mb.mailbox_id)}
        if not targets:
            raise StaleRecipientKeys(
                # The recipient is not named: the sender's inbox keeps this sentence.
                "None of the recipient's current devices can read this message: it was sealed "
                "to old or revoked keys. Fetch fresh keys and send again."
            )
        unwrapped.l2.seek(0)
        try:
            # The charge and the storing commit together: one durable commit per delivery
            # (the peer hears `accepted` only after it), and a delivery refused for the quota
            # does not count against the sender's limits either.
            with self.store.db.transaction(durable=durable):
                self._check_rates(buckets, now)
                accepted = self.store.accept_sealed(
                    mailbox_id=mb.mailbox_id,
                    digest=meta.l2_digest,
                    size=meta.l2_len,
                    source=unwrapped.l2,
                    device_ids=targets,
                    receipt=receipt,
                    now=now,
                    spool_until=now + self.config.spool_days * 86_400,
                    dedup_until=max(meta.not_after, now) + 86_400,
                    quota_bytes=quota.limit(mb.quota_bytes, self.config.quota_bytes),
                )
        except QuotaExceeded as exc:
            raise TemporaryDeliveryError.from_error(exc) from exc
        return DeliveryResult(
            accepted.receipt,
            accepted.duplicate,
            mb.mailbox_id,
            frozenset() if accepted.duplicate else frozenset(targets),
            len(active - targets),
        )

    def accept_many(
        self, batch: Sequence[tuple[Unwrapped, int]]
    ) -> list[DeliveryResult | Exception]:
        """:meth:`accept` for several deliveries, all durable in **one** commit (group
        commit: the node API gathers the deliveries that are ready at the same moment).

        Each delivery writes in a savepoint of its own (the one :meth:`_accept` opens
        around its charge and its storing; what comes before is only read), so one that is
        refused (quota, proof, unknown mailbox) leaves nothing behind and spoils no other;
        its error takes its place in the answer.  Nothing is answered to a peer before this
        returns, i.e. before the COMMIT: an ``accepted`` still means "on disk".  Two
        deliveries of the same envelope in one batch are told apart as they would be one
        after the other (the second is a duplicate): the second reads what the first wrote,
        in the same transaction.
        """
        with self.store.db.transaction():
            # The devices' acknowledgements since the last commit ride this one.
            acks = self.store.apply_acks()
            out: list[DeliveryResult | Exception] = []
            for unwrapped, now in batch:
                try:
                    out.append(self._accept(unwrapped, now=now))
                except Exception as exc:  # handed to that delivery's request
                    out.append(exc)
        self.store.acks_applied(acks)
        for result in out:  # committed: the devices may look now
            if isinstance(result, DeliveryResult):
                self._spooled(result)
        return out

    def _server_secret(self, sek_id: int) -> tuple[bytes, bytes] | None:
        key = self.secrets.by_id(sek_id)
        return None if key is None else (key.secret, key.public)

    def _check_rates(self, buckets: list[RateBucket], now: int) -> None:
        """Charge every bucket of this sender, or none when one of them is full."""
        if self.store.take_rates(buckets, now - now % HOUR) is not None:
            raise TemporaryDeliveryError(
                "The recipient's inbox is receiving too much mail right now; delivery will be "
                "retried later.",
                code="4.7.0",
            )

    def _check_proof(
        self,
        meta: envelope.OuterMeta,
        mailbox_id: bytes,
        strangers: bool,
        bits: int | None,
        now: int,
    ) -> list[RateBucket]:
        """Check the envelope's token or stamp; return the rate buckets its sender fills.

        Nothing is charged here, so a refusal (permanent: retrying cannot grow a proof)
        leaves no trace.  A sender is identified as cheaply as the envelope allows:

        * a contact by its token (the keyed hash the inbox stores), and its mail also fills
          the mailbox's contact budget;
        * a stranger has no identity the inbox can see (the sender is inside the
          encryption) and the stamp binds only mailbox, day and message.  What a stranger
          *has* shown is how much work it paid, so strangers are counted per mailbox and per
          difficulty paid, and across the inbox per difficulty paid.  A flood of stamps at
          the required difficulty fills only that bucket: it never touches the contacts'
          budget (contacts keep getting through), and a sender who pays more bits lands in a
          bucket of its own that costs the flooder twice as much per extra bit to fill.
        """
        if meta.auth_kind == envelope.AUTH_TOKEN:
            token_hash = self.token_hash(meta.token)
            if self.store.token_valid(mailbox_id, token_hash):
                return [
                    RateBucket("token", token_hash, self.config.rate_per_source_per_hour),
                    RateBucket("mailbox", mailbox_id, self.config.rate_per_mailbox_per_hour),
                ]
            # Deliberately vague: a token the person withdrew (a block) reads the same as one
            # that was never issued, so the sender cannot tell that they were blocked.
            raise PermanentDeliveryError(TOKEN_REFUSED, code="5.7.1", reason="token-rejected")
        if not strangers:
            raise PermanentDeliveryError(CONTACTS_ONLY, code="5.7.1", reason="contacts-only")
        required = self.config.pow_bits if bits is None else bits
        if meta.stamp is None:
            if required != 0:
                raise PermanentDeliveryError.from_error(
                    ProofOfWorkError("Mail from a stranger must carry a proof of work.")
                )
            paid = 0
        else:
            try:
                pow.verify(meta.stamp, mailbox_id, meta.l2_digest, required, now)
            except ProofOfWorkError as exc:
                raise PermanentDeliveryError.from_error(exc) from exc
            paid = meta.stamp.bits
        level = bytes([paid])
        return [
            RateBucket(
                "stranger", mailbox_id + level, self.config.rate_strangers_per_mailbox_per_hour
            ),
            RateBucket("strangers", level, self.config.rate_strangers_per_hour),
        ]

    # -- device sessions ------------------------------------------------------------------

    def challenge(self, mailbox_id: bytes, device_id: bytes, now: int) -> tuple[bytes, int]:
        device = self.store.device(mailbox_id, device_id)
        if device is None or device.revoked_at is not None:
            raise DeviceRefused()
        challenge = self.rng(32)
        expires = now + CHALLENGE_SECONDS
        self.store.add_challenge(challenge, mailbox_id, device_id, expires)
        return challenge, expires

    def login(
        self,
        mailbox_id: bytes,
        device_id: bytes,
        *,
        challenge: bytes,
        signature: bytes,
        now: int,
        rotations: list[RotationRecord] | None = None,
    ) -> tuple[bytes, int]:
        """Check a signed challenge; return a session token (only its hash is stored).

        A device that rotated its key while it could not reach the inbox signs with the new
        key and brings its ``rotations``: each link was signed by both the old and the new
        key, so installing a chain that extends the known key is safe before the check.
        """
        device = self.store.device(mailbox_id, device_id)
        if device is None or device.revoked_at is not None:
            raise DeviceRefused()
        if rotations:
            try:
                self._install_rotations(mailbox_id, rotations)
            except (CryptoError, MalformedData, StoreError) as exc:
                raise DeviceRefused(f"The device's key history was refused: {exc}") from exc
            device = self.store.device(mailbox_id, device_id)
            assert device is not None
        if not self.store.take_challenge(challenge, mailbox_id, device_id, now):
            raise DeviceRefused("The login challenge is unknown, expired or already used.")
        try:
            ed25519_verify(
                device.dsk_pk,
                login_message(self.onion_pk, mailbox_id, device_id, challenge),
                signature,
                "login",
            )
        except BadSignature as exc:
            raise DeviceRefused("The login signature does not match the device's key.") from exc
        token = self.rng(32)
        expires = now + SESSION_SECONDS
        self.store.add_session(hash32(token), mailbox_id, device_id, expires)
        return token, expires

    def session(self, token: bytes, now: int) -> Session:
        found = self.store.session(hash32(token), now)
        if found is None:
            raise DeviceRefused("The session has expired or the device was revoked; log in again.")
        return Session(*found)

    def pending(self, s: Session, after: int = 0) -> list[SpoolEntry]:
        return self.store.pending(s.mailbox_id, s.device_id, after=after)

    def read(self, s: Session, spool_id: int) -> tuple[int, Iterator[bytes]]:
        found = self.store.read_spooled(s.mailbox_id, s.device_id, spool_id)
        if found is None:
            raise StoreError("No such message in this device's spool.")
        return found

    def read_many(
        self, s: Session, spool_ids: Iterable[int]
    ) -> list[tuple[int, int, Iterator[bytes]]]:
        """(spool id, size, chunks) of each of ``spool_ids`` still spooled for this device, in
        the order asked; the ones that are not (acknowledged meanwhile) are left out."""
        out = []
        for spool_id in dict.fromkeys(spool_ids):
            found = self.store.read_spooled(s.mailbox_id, s.device_id, spool_id)
            if found is not None:
                out.append((spool_id, *found))
        return out

    def acknowledge(self, s: Session, spool_ids: Iterable[int]) -> int:
        """The device holds these durably: hide them from it now; their deletion rides the
        next commit (:meth:`accept_many`) or :meth:`flush_acks`, not a commit of its own."""
        return self.store.acknowledge_later(s.mailbox_id, s.device_id, spool_ids)

    def flush_acks(self) -> int:
        """Commit the acknowledgements still waiting (the inbox idles or stops)."""
        return self.store.flush_acks()

    # -- submissions ----------------------------------------------------------------------

    def submit(self, h: HandOver) -> int:
        """Queue a sealed envelope for delivery by this inbox; durable when it returns.

        ``submission_key`` makes a repeated submission of the same (re-sealed) message return
        the row already queued, so a device that crashed mid-hand-over never sends twice.
        Only what delivery needs is stored: the destination's onion (not the recipient's
        local part) and a keyed hash of the submission key.  ``msg_id`` and ``message_ref``
        are checked for form and not kept (the device knows its own messages).
        """
        address = Address.parse(h.destination)
        if not h.now < h.expires_at <= h.now + MAX_SUBMIT_LIFETIME:
            raise MalformedData("A submission's expiry must lie within the next 30 days.")
        size = h.sealed[1] if isinstance(h.sealed, tuple) else len(h.sealed)
        if size > self.config.max_envelope_bytes + (1 << 20):
            raise MessageTooLarge()
        if len(h.msg_id) != 16:
            raise MalformedData("A message id is 16 bytes.")
        if not 1 <= len(h.submission_key) <= 200:
            raise MalformedData("A submission key must be 1 to 200 characters.")
        return self.outbox.enqueue(
            mailbox_id=h.session.mailbox_id,
            device_id=h.session.device_id,
            onion=address.onion,
            envelope=h.sealed,
            submission_key=f"{h.session.device_id.hex()}:{h.submission_key}",
            now=h.now,
            expires_at=h.expires_at,
        )

    def submit_many(self, batch: Sequence[HandOver]) -> list[int | Exception]:
        """:meth:`submit` for several hand-overs, all durable in **one** commit (group
        commit: the node API gathers the hand-overs that are ready at the same moment).

        Each runs in its own savepoint, so one that is refused leaves nothing behind and
        spoils no other; its error takes its place in the answer.  No device hears
        ``queued`` before this returns, i.e. before the COMMIT.
        """
        with self.outbox.transaction_with_marks():
            return _each_in_savepoint(
                self.outbox.db, [functools.partial(self.submit, h) for h in batch]
            )

    # -- publishing keys ------------------------------------------------------------------

    def register_mailbox(
        self, *, local: str, mailbox_id: bytes, binding: ServerBinding, now: int
    ) -> ServerBinding:
        """Create a mailbox for a user whose UIK signed ``binding`` for this inbox; return the
        binding countersigned with the onion key (the user's devices need that copy)."""
        binding.verify_uik()
        self._check_binding(binding)
        if binding.mailbox_id != mailbox_id or binding.local != local:
            raise MalformedData("The binding names a different mailbox.")
        signed = binding.countersigned(self.secrets.onion_seed)
        self.store.add_mailbox(
            mailbox_id=mailbox_id,
            local=local,
            uik_pk=binding.uik_pk,
            binding=signed.encode(),
            now=now,
        )
        return signed

    def _check_binding(self, binding: ServerBinding) -> None:
        if binding.onion_pk != self.onion_pk:
            raise MalformedData("The binding is for a different inbox.")
        key = self.secrets.by_id(binding.sek_id)
        if key is None or key.public != binding.sek_pk:
            raise MalformedData("The binding names a server key this inbox does not have.")

    def publish(self, mailbox_id: bytes, update: KeyUpdate, now: int) -> ServerBinding | None:
        """Install verified key records for a mailbox; anything invalid rejects the update.

        Returns the countersigned binding when the update carried a new one.
        """
        mb = self.store.mailbox(mailbox_id)
        if mb is None:
            raise UnknownMailbox()
        signed: ServerBinding | None = None
        if update.binding is not None:
            b = update.binding
            b.verify_uik()
            if b.uik_pk != mb.uik_pk or b.mailbox_id != mailbox_id or b.local != mb.local:
                raise BadSignature("The binding was not signed by this mailbox's identity.")
            self._check_binding(b)
            signed = b.countersigned(self.secrets.onion_seed)
            self.store.set_binding(mailbox_id, signed.encode())
        if update.device_list is not None:
            dl = update.device_list
            dl.verify()
            if dl.uik_pk != mb.uik_pk:
                raise BadSignature("The device list was not signed by this mailbox's identity.")
            self.store.set_device_list(
                mailbox_id,
                device_list=dl.encode(),
                version=dl.version,
                devices=[(d.device_id, d.name, d.dsk_seq, d.dsk_pk) for d in dl.devices],
                revoked=[(r.device_id, r.revoked_at) for r in dl.revoked],
            )
        self._install_rotations(mailbox_id, update.rotations)
        for spk in update.prekeys:
            device = self.store.device(mailbox_id, spk.device_id)
            if device is None or device.revoked_at is not None:
                raise MalformedData("A prekey belongs to a device that is not on the device list.")
            if spk.dsk_seq != device.dsk_seq:
                raise MalformedData("A prekey must be signed by the device's current key.")
            spk.verify(device.dsk_pk)
            self.store.add_prekey(
                mailbox_id,
                spk.device_id,
                spk_id=spk.spk_id,
                dsk_seq=spk.dsk_seq,
                record=spk.encode(),
                created_at=spk.created_at,
                not_after=spk.not_after,
            )
        if update.profile is not None:
            self._check_profile(update.profile, mb.uik_pk, mb.profile)
            self.store.set_profile(mailbox_id, update.profile.encode())
        self._forget_bundle(mailbox_id)
        return signed

    @staticmethod
    def _check_profile(profile: Profile, uik_pk: bytes, stored: bytes | None) -> None:
        """A published profile must be the mailbox owner's, carry a PNG or JPEG avatar (or
        none), and not be older than the one served now (two devices holding the identity
        key may race; the newer profile wins everywhere)."""
        try:
            profile.verify_for(uik_pk)
        except BadSignature as exc:
            raise BadSignature("The profile was not signed by this mailbox's identity.") from exc
        if profile.avatar_type not in ("", "image/png", "image/jpeg") or (
            bool(profile.avatar_type) != bool(profile.avatar)
        ):
            raise MalformedData("A profile's avatar must be a PNG or JPEG image, or absent.")
        if stored and Profile.parse(stored).issued_at > profile.issued_at:
            raise MalformedData(
                "A newer profile is already published (from another of your devices); "
                "run `onionpost profile show` and set it again."
            )

    def _install_rotations(self, mailbox_id: bytes, records: list[RotationRecord]) -> None:
        by_device: dict[bytes, list[RotationRecord]] = {}
        for rec in records:
            by_device.setdefault(rec.device_id, []).append(rec)
        known = self.store.rotations(mailbox_id)
        for device_id, new in by_device.items():
            device = self.store.device(mailbox_id, device_id)
            if device is None or device.revoked_at is not None:
                raise MalformedData("A key rotation belongs to a device that is not listed.")
            old = [RotationRecord.parse(r) for r in known.get(device_id, [])]
            merged = {r.seq: r for r in old}
            for rec in new:
                if rec.seq in merged and merged[rec.seq] != rec:
                    raise StoreError("A different key rotation with that number is already known.")
                merged[rec.seq] = rec
            chain = tuple(merged[s] for s in sorted(merged))
            genesis = None if chain else device.dsk_pk
            head, keys = verify_chain(device_id, chain, genesis)
            if keys.get(device.dsk_seq) != device.dsk_pk:
                raise MalformedData("The key rotation does not extend the device's listed key.")
            for rec in chain:
                self.store.add_rotation(mailbox_id, device_id, rec.seq, rec.encode())
            if head.seq > device.dsk_seq:
                self.store.advance_device_key(mailbox_id, device_id, head.seq, head.pk)


def _digest(sealed: bytes | tuple[IO[bytes], int]) -> bytes:
    """hash32 of an envelope given whole or as a seekable ``(file, length)``, read in pieces
    (and the file left where it was, for storing)."""
    if not isinstance(sealed, tuple):
        return hash32(sealed)
    source, left = sealed
    start = source.tell()
    h = hashlib.blake2b(digest_size=32)
    while left:
        piece = source.read(min(1 << 20, left))
        if not piece:
            raise MalformedData("The envelope ends early.")
        h.update(piece)
        left -= len(piece)
    source.seek(start)
    return h.digest()


def _stanza_prekey_ids(l2: envelope.Readable) -> set[int]:
    """The prekey ids named by an L2's stanzas (clear in L2, so the inbox can route it)."""
    head = l2.read(7)
    if len(head) != 7 or head[:4] != envelope.L2_MAGIC:
        raise PermanentDeliveryError.from_error(
            MalformedData("The envelope does not contain an onionpost message.")
        )
    n = int.from_bytes(head[5:7], "big")
    if n == 0 or n > envelope.MAX_STANZAS:
        raise PermanentDeliveryError.from_error(MalformedData("The message has no key stanzas."))
    stanzas = l2.read(n * envelope.STANZA_BYTES)
    if len(stanzas) != n * envelope.STANZA_BYTES:
        raise PermanentDeliveryError.from_error(MalformedData("The message is truncated."))
    return {
        int.from_bytes(stanzas[i * 85 + 1 : i * 85 + 5], "big")
        for i in range(n)
        if stanzas[i * 85] == envelope.STANZA_TYPE_X25519
    }


def _each_in_savepoint(db: Database, calls: Sequence[Callable[[], R]]) -> list[R | Exception]:
    """Run each call in a savepoint of the caller's transaction (group commit): one that
    fails leaves nothing behind and spoils no other; its error takes its place."""
    out: list[R | Exception] = []
    for call in calls:
        try:
            with db.transaction():  # a savepoint
                out.append(call())
        except Exception as exc:  # handed to that item's request
            out.append(exc)
    return out
