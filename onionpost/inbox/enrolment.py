"""The inbox's side of invites and pairings: issuing codes, redeeming them, relaying pairings.

An invite opens a mailbox for keys that were made on the person's own machine: the inbox only
countersigns the binding the new identity signed, so it never holds a private key of theirs.
A pairing is relayed, not understood: the inbox keeps the two sealed messages of the exchange
for the code's lifetime and hands each to the other side; only the person's devices can open
them.

Guessing is hopeless (an 80-bit secret) and also rate-limited: every wrong, expired or used
code counts against one hourly budget per inbox (``inbox.code_failures_per_hour``); past it
the inbox stops checking codes until the hour is over, and each failure is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from onionpost.base.config import InboxConfig
from onionpost.core import quota
from onionpost.core.chain import Chain, Invitees, Member, Removal, check_limits
from onionpost.core.crypto.keys import ServerBinding, ServerKey
from onionpost.core.crypto.primitives import RandomSource, hash32, system_random
from onionpost.core.errors import (
    CodeRefused,
    InviteChainRefused,
    MalformedData,
    QuotaExceeded,
    TooManyCodeAttempts,
    UsageError,
)
from onionpost.core.pairing import Code
from onionpost.core.wire import KeyUpdate
from onionpost.inbox.postoffice import Inbox, Session
from onionpost.store.enrolment import EnrolmentStore, InviteRow, PairingRow
from onionpost.store.keystore import check_user_name

log = logging.getLogger(__name__)

HOUR = 3600
MAX_DEVICES = 64  # what a device list can hold (protocol §5.1)
_FAIL_SCOPE = "code-failure"


@dataclass(frozen=True)
class InviteInfo:
    """What the invited machine needs to make its keys: its name and this inbox's key."""

    local: str
    expires_at: int
    server_key: ServerKey
    quota_bytes: int
    max_devices: int | None


class Enrolment:
    def __init__(
        self,
        inbox: Inbox,
        store: EnrolmentStore,
        config: InboxConfig,
        *,
        rng: RandomSource = system_random,
    ) -> None:
        self.inbox = inbox
        self.store = store
        self.config = config
        self.rng = rng

    # -- invites (on the inbox machine, from the CLI) -----------------------------------

    def create_invite(
        self,
        local: str,
        *,
        now: int,
        lifetime: int | None = None,
        quota_bytes: int | None = None,
        max_devices: int | None = None,
        inviter: bytes | None = None,
        can_invite: int = 0,
    ) -> tuple[Code, int]:
        """A new invite code for ``local``; returns the code and when it expires.

        ``inviter`` is the mailbox that asks (over its device session), or ``None`` for the
        admin at the inbox machine.  A member's invite is paid from their allowance and can
        give no more quota or devices than they have themselves (:mod:`onionpost.core.chain`).
        """
        local = check_user_name(local.lower())
        if self.inbox.store.mailbox_by_local(local) is not None:
            raise UsageError(f"This inbox already has a mailbox named '{local}'.")
        if max_devices is not None and not 1 <= max_devices <= MAX_DEVICES:
            raise UsageError(f"A device limit must be between 1 and {MAX_DEVICES}.")
        if quota_bytes is not None and quota_bytes < 1 << 20:
            raise UsageError("A quota must be at least 1 MiB.")
        lifetime = self.config.invite_hours * HOUR if lifetime is None else lifetime
        if lifetime <= 0:
            raise UsageError("An invite must be valid for some time.")
        code = Code.generate("invite", self.inbox.onion_pk, rng=self.rng)
        expires_at = now + lifetime
        with self.store.db.transaction():  # the allowance checked is the allowance charged
            chain = self.chain(now)
            chain.check_invite(inviter, can_invite)
            if inviter is not None:
                me = chain.members[inviter]
                max_devices = check_limits(
                    self._quota(me), me.max_devices, quota_bytes, max_devices
                )
                if quota_bytes is None:
                    quota_bytes = me.quota_bytes
            self.store.add_invite(
                hash32(code.claim()),
                local=local,
                now=now,
                expires_at=expires_at,
                quota_bytes=quota_bytes,
                max_devices=max_devices,
                invited_by=inviter,
                can_invite=can_invite,
            )
        log.info("invite issued for '%s' (valid until %d)", local, expires_at)
        return code, expires_at

    # -- the invite chain -----------------------------------------------------------------

    def chain(self, now: int) -> Chain:
        """Everyone with a mailbox here, as an invite chain (``Member.quota_bytes`` is the
        quota set for them, ``None``: the inbox's default)."""
        rows = {r.mailbox_id: r for r in self.store.chain()}
        reserved = self.store.reserved(now)
        members = []
        for mb in self.inbox.store.mailboxes():
            row = rows.get(mb.mailbox_id)
            members.append(
                Member(
                    mb.mailbox_id,
                    mb.local,
                    row.invited_by if row else None,
                    row.allowance if row else 0,
                    reserved.get(mb.mailbox_id, 0),
                    mb.quota_bytes,
                    self.store.max_devices(mb.mailbox_id),
                )
            )
        return Chain(members)

    def _quota(self, m: Member) -> int:
        return quota.limit(m.quota_bytes, self.config.quota_bytes)

    def remove(
        self, remover: bytes | None, local: str, invitees: Invitees | None, now: int
    ) -> Removal:
        """Remove ``local``'s mailbox (and, as asked, the people they invited) if
        ``remover`` (``None``: the admin) may; durable when it returns."""
        with self.store.db.transaction():
            chain = self.chain(now)
            plan = chain.plan_removal(remover, chain.by_name(local.lower()).mailbox_id, invitees)
            for m in plan.removed:
                self.inbox.store.remove_mailbox(m.mailbox_id)
                self.inbox.outbox.remove_mailbox(m.mailbox_id)
                self.store.forget_mailbox(m.mailbox_id)
            self.store.reparent([m.mailbox_id for m in plan.reparented], plan.new_parent, now)
        log.info(
            "removed %s along the invite chain%s",
            ", ".join(m.name for m in plan.removed),
            f" ({len(plan.reparented)} re-parented)" if plan.reparented else "",
        )
        return plan

    # -- invites (over the onion, from the invited machine) -----------------------------

    def invite_info(self, claim: bytes, now: int) -> InviteInfo:
        row = self._open_invite(claim, now)
        return InviteInfo(
            row.local,
            row.expires_at,
            self.inbox.secrets.current(),
            quota.limit(row.quota_bytes, self.config.quota_bytes),
            row.max_devices,
        )

    def redeem(self, claim: bytes, update: KeyUpdate, self_token: bytes, now: int) -> ServerBinding:
        """Open the invited mailbox for the keys in ``update``; durable when it returns.

        A redeem whose answer was lost is answered again with the same countersigned binding
        (same invite, same identity), so the invited machine can simply retry.
        """
        self._guard(now)
        row = self.store.invite(hash32(claim))
        binding, device_list = update.binding, update.device_list
        if binding is None or device_list is None or not update.prekeys:
            raise MalformedData("A redeem must carry a binding, a device list and a prekey.")
        if row is not None and row.used_at is not None and row.uik_pk == binding.uik_pk:
            mb = self.inbox.store.mailbox_by_local(row.local)
            if mb is not None and mb.mailbox_id == row.mailbox_id:
                return ServerBinding.parse(mb.binding)
        row = self._open_invite(claim, now, row=row)
        if binding.local != row.local:
            raise MalformedData(f"The invite is for '{row.local}', not '{binding.local}'.")
        if len(device_list.devices) != 1:
            raise MalformedData("A new identity starts with exactly one device.")
        with self.store.db.transaction():
            if not self.store.use_invite(row.claim_hash, binding.mailbox_id, binding.uik_pk, now):
                raise CodeRefused("This invite code was used a moment ago.")
            signed = self.inbox.register_mailbox(
                local=row.local, mailbox_id=binding.mailbox_id, binding=binding, now=now
            )
            self.inbox.publish(
                binding.mailbox_id,
                KeyUpdate(device_list=device_list, prekeys=update.prekeys),
                now,
            )
            self.inbox.store.add_token(binding.mailbox_id, self.inbox.token_hash(self_token), now)
            if row.quota_bytes is not None:
                self.inbox.store.set_policy(
                    binding.mailbox_id,
                    accepts_strangers=True,
                    pow_bits=None,
                    quota_bytes=row.quota_bytes,
                )
            self.store.set_max_devices(binding.mailbox_id, row.max_devices)
            if row.invited_by is not None and not self.store.spend(
                row.invited_by, 1 + row.can_invite
            ):
                raise InviteChainRefused(
                    "The person who invited you can no longer give this invite; ask them "
                    "for a new one."
                )
            self.store.join_chain(
                binding.mailbox_id, invited_by=row.invited_by, allowance=row.can_invite, now=now
            )
        log.info("invite for '%s' redeemed: mailbox opened", row.local)
        return signed

    def _open_invite(self, claim: bytes, now: int, row: InviteRow | None = None) -> InviteRow:
        self._guard(now)
        row = row or self.store.invite(hash32(claim))
        if row is None:
            self._failed(now, "an unknown invite code")
            raise CodeRefused(
                "This inbox knows no such invite code. Check that it was typed exactly, or ask "
                "for a new one."
            )
        if row.used_at is not None:
            self._failed(now, "a used invite code")
            raise CodeRefused("This invite code was already used. Ask for a new one.")
        if row.expires_at <= now:
            self._failed(now, "an expired invite code")
            raise CodeRefused("This invite code has expired. Ask for a new one.")
        return row

    # -- pairings -----------------------------------------------------------------------

    def offer(self, s: Session, slot: bytes, offer: bytes, now: int) -> int:
        """An existing device opens a pairing slot; returns when it expires."""
        if len(slot) != 16 or len(offer) != 32:
            raise MalformedData("A pairing offer is a 16-byte slot and a 32-byte key.")
        self.check_device_room(s.mailbox_id, adding=1)
        expires_at = now + self.config.pairing_minutes * 60
        self.store.add_pairing(
            slot,
            mailbox_id=s.mailbox_id,
            device_id=s.device_id,
            offer=offer,
            now=now,
            expires_at=expires_at,
        )
        return expires_at

    def pairing_for_joiner(self, slot: bytes, now: int) -> PairingRow:
        self._guard(now)
        row = self.store.pairing(slot)
        if row is None or row.expires_at <= now or row.state == "aborted":
            self._failed(now, "an unknown or expired pairing code")
            raise CodeRefused(
                "This inbox knows no such pairing code, or it has expired (a pairing code is "
                "valid for a few minutes). Run `onionpost devices add` again for a new one."
            )
        return row

    def join(self, slot: bytes, join_pk: bytes, box: bytes, now: int) -> None:
        row = self.pairing_for_joiner(slot, now)
        if len(join_pk) != 32 or not 40 <= len(box) <= 16_384:
            raise MalformedData("A join request is a 32-byte key and a sealed request.")
        if row.state != "offered" or not self.store.join_pairing(slot, join_pk, box, now):
            self._failed(now, "a used pairing code")
            raise CodeRefused("This pairing code was already used. Ask for a new one.")

    def pairing_for_owner(self, s: Session, slot: bytes, now: int) -> PairingRow:
        row = self.store.pairing(slot)
        if row is None or row.mailbox_id != s.mailbox_id or row.expires_at <= now:
            raise CodeRefused("The pairing has expired; run `onionpost devices add` again.")
        return row

    def finish(self, s: Session, slot: bytes, grant_box: bytes | None, now: int) -> None:
        """The existing device answers (or, with no answer, aborts) a joined pairing."""
        row = self.pairing_for_owner(s, slot, now)
        if grant_box is not None and (row.state != "joined" or len(grant_box) > 1 << 20):
            raise MalformedData("Only a joined pairing can be answered.")
        state = "aborted" if grant_box is None else "granted"
        if not self.store.finish_pairing(slot, state, grant_box, now):
            raise CodeRefused("The pairing has expired; run `onionpost devices add` again.")

    # -- limits ---------------------------------------------------------------------------

    def check_device_room(self, mailbox_id: bytes, *, adding: int = 0, total: int = 0) -> None:
        """Refuse a device list longer than the mailbox's device limit."""
        limit = self.store.max_devices(mailbox_id)
        if limit is None:
            return
        count = total or len(self.inbox.store.devices(mailbox_id)) + adding
        if count > limit:
            raise QuotaExceeded(
                f"This mailbox may have at most {limit} device(s); revoke one first "
                "(onionpost devices revoke)."
            )

    def _guard(self, now: int) -> None:
        window = now - now % HOUR
        limit = self.config.code_failures_per_hour
        if self.inbox.store.rate_count(_FAIL_SCOPE, b"", window) >= limit:
            raise TooManyCodeAttempts()

    def _failed(self, now: int, what: str) -> None:
        window = now - now % HOUR
        self.inbox.store.take_rate(_FAIL_SCOPE, b"", window, self.config.code_failures_per_hour)
        count = self.inbox.store.rate_count(_FAIL_SCOPE, b"", window)
        log.warning(
            "someone tried %s at this inbox (%d of %d allowed this hour)",
            what,
            count,
            self.config.code_failures_per_hour,
        )
